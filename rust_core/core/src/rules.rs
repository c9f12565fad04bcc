//! The rules tier: regex and whole-word keyword rules compiled into one matcher, raising labels and risk tags.
