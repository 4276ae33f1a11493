"""Training: pretraining a memory model from scratch (`PretrainConfig`, `pretrain`, `recipe`) or retrofitting
one into a pretrained base model (`RetrofitConfig`, the same loop), and continual
finetuning on a stream of facts (`FinetuneConfig`, `Stream`, `finetune`, the public `Trainer`), with
the method registry (`register_method`, `get_method`, `method_names`) and the selection-rule registry
(`register_rule`, `get_rule`, `rule_names`), the learning/forgetting protocol (`EvalSets`), and the one
reader/writer of run directories (`smviz.train.rundir`)."""

from smviz.train.config import FinetuneConfig
from smviz.train.finetune import finetune
from smviz.train.methods import Method, get_method, method_names, register_method
from smviz.train.pretrain import PretrainConfig, RetrofitConfig, pretrain
from smviz.train.recipes import recipe
from smviz.evaluate.protocol import EvalSets, evaluate_point, summarize
from smviz.train.rundir import FinetuneRunDir, PretrainRunDir
from smviz.train.selection import RowSelector, Selection, SelectionRule, get_rule, register_rule, rule_names
from smviz.train.stream import BACKGROUNDS, COMPOSITIONS, Stream, stream_stats
from smviz.train.trainer import StepResult, Trainer

__all__ = [
    "BACKGROUNDS", "COMPOSITIONS", "EvalSets", "Stream", "FinetuneConfig", "FinetuneRunDir", "Method", "PretrainConfig", "RetrofitConfig",
    "PretrainRunDir", "RowSelector", "Selection", "SelectionRule", "StepResult", "Trainer", "evaluate_point", "finetune",
    "get_method", "get_rule", "method_names", "pretrain", "recipe", "register_method", "register_rule",
    "rule_names", "stream_stats", "summarize",
]
