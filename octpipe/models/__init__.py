"""Networks and training: f-AnoGAN (``fanogan``) and the paper's baselines."""
