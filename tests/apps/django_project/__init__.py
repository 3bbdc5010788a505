"""The Django project the adapter tests run under gunicorn (WSGI) and uvicorn (ASGI)."""
