"""wprlhf: RLHF for r/WritingPrompts-style story writing, small enough for a laptop CPU."""

__version__ = "0.1.0"
