"""Weight store (safetensors + JSON per member), official-weight import and download."""
