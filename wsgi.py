"""What gunicorn imports: ``gunicorn -c gunicorn.conf.py wsgi:app``."""

from llmlb import create_app

app = create_app()
