class LoraInputError(ValueError):
    """Bad model-side input (missing path, absent target module, no bitsandbytes). One line."""
