"""Pipeline steps as plain typed functions; nothing here imports Prefect or KFP."""
