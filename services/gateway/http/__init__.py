"""The HTTP side: the FastAPI app, its routes and middleware, the fast lane and the web page."""
