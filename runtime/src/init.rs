//! Random initialisation.
