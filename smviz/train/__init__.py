"""Training: pretraining a memory model from scratch (`PretrainConfig`, `pretrain`, `recipe`) or retrofitting
one into a pretrained base model (`RetrofitConfig`, the same loop), and continual
finetuning on a stream of facts (`FinetuneConfig`, `Stream`, `finetune`, the public `Trainer`), with
the method registry (`register_method`, `get_method`, `method_names`) and the selection-rule registry
(`register_rule`, `get_rule`, `rule_names`), the learning/forgetting protocol (`EvalSets`), and the one
reader/writer of run directories (`smviz.train.rundir`)."""

# the built-in methods and rules are registered whenever any smviz.train module is imported (a lookup by
# name, `get_method("sparse")`, must find them); the rest is imported on first use (`smviz.lazy`), so the
# app's readers of run directories (`rundir`) do not import peft and transformers' model classes
import smviz.train.builtin  # noqa: F401
from smviz.lazy import lazy_exports

EXPORTS = {
    ".config": ["FinetuneConfig"],
    ".finetune": ["finetune"],
    ".methods": ["Method", "get_method", "method_names", "register_method"],
    ".pretrain": ["PretrainConfig", "RetrofitConfig", "pretrain"],
    ".recipes": ["recipe"],
    "smviz.evaluate.protocol": ["EvalSets", "evaluate_point", "summarize"],
    ".rundir": ["FinetuneRunDir", "PretrainRunDir"],
    ".selection": ["RowSelector", "Selection", "SelectionRule", "get_rule", "register_rule", "rule_names"],
    ".stream": ["BACKGROUNDS", "COMPOSITIONS", "Stream", "stream_stats"],
    ".trainer": ["StepResult", "Trainer"],
}
__all__ = lazy_exports(__name__, EXPORTS)
