"""Record and metric keys, in one place (kebab-case, as Flower's ``num-examples``)."""

NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
EPSILON = "epsilon"
DELTA = "delta"

# Summable evaluation counts (per-user sums); see fedrec.metrics.
NUM_USERS = "num-users"
NUM_RATINGS = "num-ratings"
SUM_SQ_ERR = "sum-sq-err"
SUM_ABS_ERR = "sum-abs-err"


def metric_key(name: str, k: int) -> str:
    """Name of a top-K metric as written to metrics.json, e.g. ``recall@20``."""
    return f"{name}@{k}"


def sum_key(name: str, k: int) -> str:
    """Name of a summable per-user total, e.g. ``sum-recall-at-20``."""
    return f"sum-{name}-at-{k}"


RANKING_METRICS = ("precision", "recall", "ndcg", "hr")

EXHAUSTED = "exhausted"  # 1 if the client's privacy budget stopped it this round
# eval-with-train: the train config asks for the counts of the model sent, and the reply
# carries them in a record of their own
EVALUATE_RECEIVED = "evaluate-received"
EVALUATION = "evaluation"
TRAIN_SECONDS = "train-seconds"

# distributed DP (fedrec.ddp): the plan a server sends with each SecAgg+ fit round
DDP_MU_CLIENT = "ddp-mu-client"  # Skellam parameter of one client's noise share
DDP_N_MIN = "ddp-n-min"  # honest clients whose shares the guarantee counts on
DDP_TASK = "ddp-task"  # "prior" (item counts), "train" (update + counts), "evaluate"
