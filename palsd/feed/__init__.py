"""The facility feed: budgets and prices in over MQTT, status and liveness out."""
