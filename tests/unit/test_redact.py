"""The one redaction: every form a password takes in a connection string, masked in text, logs and errors."""

import logging

import pytest

from driftloop.settings import MASK, Settings, SettingsError, load_settings, redact, redact_error, redact_logs

pytestmark = pytest.mark.unit

SECRET = "Pl4nted-S3cret-xyz"


def cluster(**changes: str) -> Settings:
    return Settings(**{"profile": "cluster", "data_dir": "/data",
                       "mlflow_tracking_uri": f"http://driftloop:{SECRET}@mlflow:5000",
                       "postgres_dsn": f"postgresql://driftloop:{SECRET}@driftloop-postgres:5432/driftloop",
                       "redis_url": f"driftloop-redis:6379,password={SECRET},ssl=true", **changes})


@pytest.mark.parametrize(("text", "shown"), [
    (f"registry postgresql+psycopg://driftloop:{SECRET}@driftloop-postgres:5432/driftloop",
     "registry postgresql+psycopg://driftloop:***@driftloop-postgres:5432/driftloop"),
    (f"redis: host:6379,password={SECRET},ssl=true", "redis: host:6379,password=***,ssl=true"),
    (f"redis://:{SECRET}@host:6379/0", "redis://:***@host:6379/0"),
    ("http://u:p@ss@host:5000/api", "http://u:***@host:5000/api"),  # an unencoded "@": the last one ends it
    (f"host=db user=u password={SECRET} dbname=x", "host=db user=u password=*** dbname=x"),
    (f"{{'redis_url': 'h:1,password={SECRET}', 'password': '{SECRET}'}}",
     "{'redis_url': 'h:1,password=***', 'password': '***'}"),
    (f'{{"uri": "http://a:{SECRET}@h", "next": "x"}}', '{"uri": "http://a:***@h", "next": "x"}'),
    ("http://mlflow:5000/api/2.0 and a@b.c", "http://mlflow:5000/api/2.0 and a@b.c"),  # no password: as is
    ("sqlite:////state/mlflow.db", "sqlite:////state/mlflow.db"),
])
def test_patterns_mask_passwords_and_nothing_else(text, shown):
    assert redact(text) == shown


def test_the_settings_passwords_are_masked_wherever_they_appear():
    settings = cluster(mlflow_tracking_uri="http://driftloop:Pl4nted%2FOther@mlflow:5000")
    text = f"a driver quoting {SECRET} alone, and the decoded Pl4nted/Other"
    assert redact(text, settings) == f"a driver quoting {MASK} alone, and the decoded {MASK}"
    short = cluster(redis_url="h:6379,password=pw")  # too short to mask wherever its letters occur
    assert redact("pwd password=pw", short) == "pwd password=***"


def test_config_repr_and_settings_errors_show_no_password(monkeypatch):
    settings = cluster()
    assert SECRET not in str(settings.locations()) and SECRET not in repr(settings)
    assert "driftloop:***@driftloop-postgres" in settings.locations()["feast_registry"]
    for name, value in {"DRIFTLOOP_PROFILE": "cluster", "DRIFTLOOP_REDIS_URL": f"h:1,password={SECRET}",
                        "DRIFTLOOP_POSTGRES_DSN": f"postgresql://u:{SECRET}@h/db"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as raised:  # pydantic's own message would quote every input
        load_settings()
    assert SECRET not in str(raised.value) and raised.value.__cause__ is None
    assert "DRIFTLOOP_MLFLOW_TRACKING_URI" in str(raised.value)


@pytest.fixture
def record_factory():
    saved = logging.getLogRecordFactory()
    yield
    logging.setLogRecordFactory(saved)


def test_log_records_are_masked_whichever_handler_writes_them(record_factory, caplog):
    settings = cluster()
    redact_logs(settings)
    redact_logs(settings)  # again: one mask, not two stacked
    logger = logging.getLogger("driftloop.test")
    with caplog.at_level(logging.INFO, logger="driftloop.test"):
        logger.info("connecting to %s", settings.postgres_dsn)
        try:
            raise ConnectionError(f"no server at {settings.tracking_uri}")
        except ConnectionError:
            logger.exception("failed with %s alone", SECRET)
    text = caplog.text
    assert "postgresql://driftloop:***@driftloop-postgres" in text and "no server at http://driftloop:***@" in text
    assert SECRET not in text


def test_an_error_is_masked_in_place_with_its_causes():
    settings = cluster()
    try:
        try:
            raise OSError(f"cannot reach {settings.redis_url}")
        except OSError as cause:
            raise RuntimeError(f"step failed at {settings.tracking_uri}") from cause
    except RuntimeError as error:
        caught, masked = error, redact_error(error, settings)
    assert masked is caught and isinstance(masked, RuntimeError) and masked.__traceback__ is not None
    assert str(masked) == "step failed at http://driftloop:***@mlflow:5000"
    assert str(masked.__cause__) == "cannot reach driftloop-redis:6379,password=***,ssl=true"
