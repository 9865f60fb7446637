"""A parallel layout planner (tools/plan_parallelism.py): the model's parameters per GPU
(model.py), its memory per GPU (memory.py), the step time of a layout (timing.py) and
the search over layouts with their command lines (search.py)."""
