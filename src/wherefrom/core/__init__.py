"""The attribution core: rows, tokenization, the task's loss and measurement, module tracking,
per-example gradients, scoring and atomic storage. Depends on nothing else in wherefrom."""
