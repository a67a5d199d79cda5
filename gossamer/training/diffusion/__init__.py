"""Decentralized diffusion, the network-free core (McAllister et al. 2025).

The data set is clustered (``partition``); one flow-matching expert trains on each cluster in
isolation (``models``, ``flow``); a router learns p(cluster | x_t, t) (``router``); sampling
combines the experts' velocities with the router's weights (``ensemble``). Convention everywhere:
t = 0 is noise, t = 1 is data, x_t = t·x1 + (1 − t)·x0.

The core touches no socket: the network parts (``announcements``, ``verify``, ``hosts``,
``remote_experts``, ``async_sampling``; their names are exported here too) supply remote experts
as callables ``velocity(x_t, t) -> v`` over the rows ``plan_requests`` assigns them, and ship
recipes and weights as bytes (``PartitionRecipe.to_bytes``, ``expert_to_bytes``). Names load
lazily, like the top-level SDK surface, so importing the package does not import torch until a
name needs it.
"""

from __future__ import annotations

from gossamer._lazy import lazy_face

_EXPORTS: dict[str, str] = {
    "ExpertHost": "hosts",
    "RunExperts": "announcements",
    "ExpertRecord": "announcements",
    "AnnouncementRefused": "verify",
    "mode_arguments": "async_sampling",
    "withdraw": "announcements",
    "announce": "announcements",
    "fetch_router": "remote_experts",
    "ROUTER_SLOT": "announcements",
    "Latency": "hosts",
    "discover": "announcements",
    "Verifier": "verify",
    "RemoteExpert": "remote_experts",
    "connect_experts": "remote_experts",
    "sample_network": "async_sampling",
    "content_id": "serving",
    "classifier_features": "metrics",
    "checkpoint_meta": "serving",
    "PlanError": "workflow",
    "ImageSet": "data",
    "load_digits_split": "data",
    "load_image_folder": "data",
    "PartitionRecipe": "partition",
    "fit_partition": "partition",
    "cluster_sizes": "partition",
    "ExpertSpec": "models",
    "register_expert": "models",
    "registered_experts": "models",
    "count_params": "models",
    "forward_flops": "models",
    "MLPVelocity": "models",
    "TinyUNet": "models",
    "training_flops": "models",
    "expert_to_bytes": "models",
    "expert_from_bytes": "models",
    "flow_path": "flow",
    "flow_matching_loss": "flow",
    "train_expert": "flow",
    "euler_sample": "flow",
    "Router": "router",
    "train_router": "router",
    "router_accuracy": "router",
    "router_steps_for_budget": "router",
    "router_to_bytes": "router",
    "router_from_bytes": "router",
    "RoutingMode": "ensemble",
    "ExpertUnavailable": "ensemble",
    "NoExpertForRows": "ensemble",
    "routing_weights": "ensemble",
    "plan_requests": "ensemble",
    "combine": "ensemble",
    "ensemble_velocity": "ensemble",
    "sample": "ensemble",
    "sample_by_prior": "ensemble",
    "train_classifier": "metrics",
    "classifier_accuracy": "metrics",
    "frechet_distance": "metrics",
    "sample_quality": "metrics",
    "confident_rate": "metrics",
    "make_grid": "images",
    "write_png": "images",
    "save_image_grid": "images",
    "encode_png": "images",
    "decode_png": "images",
    "ComparisonConfig": "experiment",
    "run_local_comparison": "experiment",
    "split_steps": "experiment",
}

__all__, __getattr__, __dir__ = lazy_face(__name__, _EXPORTS)
