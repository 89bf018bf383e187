"""Serving adapters over HTTP: many tasks on one backbone, dynamic batching, a page to try them.

Needs the ``serve`` extra (FastAPI, uvicorn, python-multipart, fastapi-offline). ``audiopetl serve`` runs it.
"""

from .app import ServeLimits, create_app
from .tasks import LORA_BATCHING, Engine, Task, load_tasks, parse_task_specs

__all__ = ["LORA_BATCHING", "Engine", "ServeLimits", "Task", "create_app", "load_tasks", "parse_task_specs"]
