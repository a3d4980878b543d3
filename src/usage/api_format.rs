//! Which API a request speaks, read from its path: `/authz` infers the format (and the
//! provider family) from the proxied path, and the proxies' upstream report may name
//! the path instead of the format.

/// The API format of a path, and the provider family it belongs to.
pub fn of_path(path: &str) -> Option<(&'static str, &'static str)> {
    let path = path
        .split('?')
        .next()
        .unwrap_or_default()
        .trim_end_matches('/');
    let tail = |suffix: &str| path.ends_with(suffix);
    Some(if tail("/chat/completions") {
        ("openai_chat", "openai")
    } else if tail("/responses") {
        ("openai_responses", "openai")
    } else if tail("/completions") {
        ("openai_completions", "openai")
    } else if tail("/embeddings") {
        ("openai_embeddings", "openai")
    } else if tail("/messages") {
        ("anthropic_messages", "anthropic")
    } else if tail(":generateContent") || tail(":streamGenerateContent") {
        ("gemini_generate_content", "gemini")
    } else if tail(":embedContent") || tail(":batchEmbedContents") {
        ("gemini_embed_content", "gemini")
    } else {
        return None;
    })
}

#[cfg(test)]
mod tests {
    use super::of_path;

    #[test]
    fn formats_from_paths() {
        assert_eq!(
            of_path("/v1/chat/completions"),
            Some(("openai_chat", "openai"))
        );
        assert_eq!(
            of_path("/openai/v1/chat/completions?x=1"),
            Some(("openai_chat", "openai"))
        );
        assert_eq!(
            of_path("/v1/responses"),
            Some(("openai_responses", "openai"))
        );
        assert_eq!(
            of_path("/v1/embeddings"),
            Some(("openai_embeddings", "openai"))
        );
        assert_eq!(
            of_path("/v1/messages"),
            Some(("anthropic_messages", "anthropic"))
        );
        assert_eq!(
            of_path("/v1beta/models/gemini-1.5-pro:generateContent"),
            Some(("gemini_generate_content", "gemini"))
        );
        assert_eq!(of_path("/health"), None);
    }
}
