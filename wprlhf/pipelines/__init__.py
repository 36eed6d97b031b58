"""Runs of several phases in one resumable directory: `stories` (the writing-prompts job), `compare` (methods on
one budget), `loop` (the iterative loop) and `sentiment` (the movie-review demos)."""
