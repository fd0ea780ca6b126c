"""The trainer's options as data (declare.Option), the list of them (trainer), the command line made from it
(parser), kohya_ss GUI files read into them (kohya_ss), and the flag table of docs/guide.md (docs_table)."""

from .declare import SWITCH, Option, group
from .parser import build_parser, nearest
from .trainer import trainer_options

__all__ = ["SWITCH", "Option", "build_parser", "group", "nearest", "trainer_options"]
