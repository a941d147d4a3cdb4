//! Fathom's procedural macros.
