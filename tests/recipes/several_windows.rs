//! Placeholder: filled in by the recipe's own work.
