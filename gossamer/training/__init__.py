"""Training layer: DiLoCo, compression, state sync, decentralized diffusion."""
