//! Weights in the Hugging Face safetensors layout.
