"""fullrange: full-range timestep distillation of ANN teachers into spiking networks."""
