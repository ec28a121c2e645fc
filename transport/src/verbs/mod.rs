//! verbs (in progress)
