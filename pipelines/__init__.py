"""Training pipelines: plain step functions (``steps``) and thin Prefect and KFP adapters over them."""
