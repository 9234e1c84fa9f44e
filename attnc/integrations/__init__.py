"""Integrations of attnc kernels into other libraries. Each is a submodule that imports its library
only when imported itself: `attnc.integrations.transformers` (Hugging Face transformers' attention
interface) needs `pip install 'attnc[transformers]'`.
"""
