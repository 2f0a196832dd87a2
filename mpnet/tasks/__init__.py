"""Downstream tasks: GLUE definitions, official metrics and data readers."""
from .glue import GLUE_TASKS, METRICS, Split, Task, TaskData, custom_task, get_task, load_task_data

__all__ = ["GLUE_TASKS", "METRICS", "Split", "Task", "TaskData", "custom_task", "get_task", "load_task_data"]
