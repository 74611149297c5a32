"""Gradient communication across workers: compression (DGC), gradient coding, federated learning glue."""
from .coded_run import CodedRunResult, coded_gradient_descent
from .dgc import DGCCompressor, SparseGrad, decode_block16, encode_block16, select_topk, warmup_density
from .dgc_hook import DGCHookError, DGCHookState, DGCState, dgc_comm_hook, dgc_hook
from .federated import (ClientData, FedAvgClient, client_accuracies, clip_and_noise, dirichlet_split, dp_fedavg_round,
                        fedavg_round, fedavg_shared_state, hyperfl_round, local_train_fedavg, local_train_hyperfl,
                        weighted_average)
from .coding_schemes import SCHEMES, GCScheme, MSGCScheme, SRSGCScheme, make_scheme
from .gradient_codes import (CodingError, DecodeError, GradientCode, Task, compute_task, cyclic_repetition_code,
                             fractional_repetition_code, partition)
from .launch import WorkerError, run_workers
from .simulate import Aggregator, CompressorAggregator, DataParallelSimulator, MeanAggregator, shard
from .straggler_models import (BurstyStragglerModel, PerRoundStragglerModel, gilbert_elliott_delays, iid_delays,
                               markov_straggler_states, pattern_delays, sample_admissible_pattern)
from .stragglers import GridResult, SimulationResult, grid_search, round_outcome, simulate_runtime

__all__ = ["run_workers", "WorkerError",
           "DGCCompressor", "SparseGrad", "warmup_density", "select_topk", "encode_block16", "decode_block16",
           "DGCHookState", "dgc_comm_hook", "DGCHookError", "DGCState", "dgc_hook", "DataParallelSimulator", "Aggregator", "MeanAggregator",
           "CompressorAggregator", "shard",
           "ClientData", "dirichlet_split", "FedAvgClient", "fedavg_shared_state", "weighted_average",
           "local_train_fedavg", "local_train_hyperfl", "fedavg_round", "dp_fedavg_round", "hyperfl_round",
           "clip_and_noise", "client_accuracies",
           "GradientCode", "fractional_repetition_code", "cyclic_repetition_code", "GCScheme", "SRSGCScheme",
           "MSGCScheme", "make_scheme", "SCHEMES", "Task", "compute_task", "partition", "CodingError", "DecodeError",
           "PerRoundStragglerModel", "BurstyStragglerModel", "markov_straggler_states", "gilbert_elliott_delays",
           "iid_delays", "pattern_delays", "sample_admissible_pattern", "round_outcome", "simulate_runtime",
           "grid_search", "SimulationResult", "GridResult", "coded_gradient_descent", "CodedRunResult"]
