"""dmrepl: replicate datamart operations to Google Pub/Sub, Azure Event Hubs or a local NDJSON file."""

__version__ = "0.1.0"
