"""The front end: `.attn` text -> syntax tree (`ast`) -> typed IR (`lower`), with located diagnostics."""
