"""The width methods: wide & sparse, adaptive width, self-expanding. Each is a sibling package that
never imports ``train/``, ``studies/`` or ``cli``; it talks to the trainer through callbacks."""
