"""The data layer: problems from every source, the synthetic arith task, prompt formats."""
from .arith import arith_exemplars, generate_arith
from .prompts import PROMPT_STYLES, build_prompt, default_prompt_style, load_exemplars, stop_strings
from .records import Problem
from .sources import KNOWN_SOURCES, load_problems

__all__ = ["Problem", "load_problems", "generate_arith", "arith_exemplars", "build_prompt", "stop_strings", "default_prompt_style",
           "load_exemplars", "PROMPT_STYLES", "KNOWN_SOURCES"]
