//! Feature hashing bit-identical to scikit-learn's HashingVectorizer (signed MurmurHash3, word / char / char_wb n-grams).
