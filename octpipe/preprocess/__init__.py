"""Pure preprocessing functions: intensity domains, resampling, layers, flattening."""
