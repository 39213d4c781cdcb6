"""The HTTP front end every server shares: the HTTP/1.1 server and its limits, the app factory with the common
routes (health, metrics, shutdown), API keys."""
