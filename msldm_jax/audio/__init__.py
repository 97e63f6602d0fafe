"""Signal processing shared by losses, discriminators and evaluation (STFT, mel)."""
