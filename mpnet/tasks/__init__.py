"""Downstream tasks: GLUE definitions and official metrics (glue.py), data readers (readers.py)."""
from .glue import GLUE_TASKS, METRICS, Task, custom_task, get_task
from .readers import Split, TaskData, load_task_data

__all__ = ["GLUE_TASKS", "METRICS", "Split", "Task", "TaskData", "custom_task", "get_task", "load_task_data"]
