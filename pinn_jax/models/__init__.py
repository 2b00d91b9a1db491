"""Generator networks (Flax NNX) that map diffraction amplitudes to object patches."""
