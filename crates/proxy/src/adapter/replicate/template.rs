//! Chat messages → one prompt, per model family.

use keypool_config::ChatTemplate;

/// One message, flattened to text.
pub struct Turn<'a> {
    pub role: &'a str,
    pub text: String,
}

/// The template for a model: the key's configured one, else Llama 3 when the model name says
/// so, else Mistral's `[INST]` format.
pub fn choose(configured: Option<&ChatTemplate>, model: &str) -> ChatTemplate {
    if let Some(t) = configured {
        return t.clone();
    }
    let m = model.to_ascii_lowercase();
    if m.contains("llama-3") || m.contains("llama3") {
        ChatTemplate::Llama3
    } else {
        ChatTemplate::Mistral
    }
}

pub fn render(template: &ChatTemplate, turns: &[Turn<'_>]) -> String {
    let system: Vec<&str> = turns
        .iter()
        .filter(|t| t.role == "system" || t.role == "developer")
        .map(|t| t.text.as_str())
        .collect();
    let system = system.join("\n");
    let dialogue = turns
        .iter()
        .filter(|t| t.role == "user" || t.role == "assistant");
    match template {
        ChatTemplate::Mistral => {
            let mut out = String::from("<s>");
            let mut first_user = true;
            for t in dialogue {
                if t.role == "user" {
                    out.push_str("[INST] ");
                    if first_user && !system.is_empty() {
                        out.push_str(&system);
                        out.push_str("\n\n");
                    }
                    first_user = false;
                    out.push_str(&t.text);
                    out.push_str(" [/INST]");
                } else {
                    out.push(' ');
                    out.push_str(&t.text);
                    out.push_str("</s>");
                }
            }
            out
        }
        ChatTemplate::Llama3 => {
            let mut out = String::from("<|begin_of_text|>");
            let header = |out: &mut String, role: &str| {
                out.push_str("<|start_header_id|>");
                out.push_str(role);
                out.push_str("<|end_header_id|>\n\n");
            };
            if !system.is_empty() {
                header(&mut out, "system");
                out.push_str(&system);
                out.push_str("<|eot_id|>");
            }
            for t in dialogue {
                header(&mut out, t.role);
                out.push_str(&t.text);
                out.push_str("<|eot_id|>");
            }
            header(&mut out, "assistant");
            out
        }
        ChatTemplate::Custom(template) => {
            let mut prompt = String::new();
            for t in dialogue {
                prompt.push_str(if t.role == "user" {
                    "User: "
                } else {
                    "Assistant: "
                });
                prompt.push_str(&t.text);
                prompt.push('\n');
            }
            prompt.push_str("Assistant:");
            template
                .replace("{{system}}", &system)
                .replace("{{prompt}}", &prompt)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn turns() -> Vec<Turn<'static>> {
        vec![
            Turn {
                role: "system",
                text: "Be brief.".into(),
            },
            Turn {
                role: "user",
                text: "Hi".into(),
            },
            Turn {
                role: "assistant",
                text: "Hello!".into(),
            },
            Turn {
                role: "user",
                text: "Joke?".into(),
            },
        ]
    }

    #[test]
    fn mistral_inst_format() {
        assert_eq!(
            render(&ChatTemplate::Mistral, &turns()),
            "<s>[INST] Be brief.\n\nHi [/INST] Hello!</s>[INST] Joke? [/INST]"
        );
    }

    #[test]
    fn llama3_headers() {
        let p = render(&ChatTemplate::Llama3, &turns());
        assert!(p.starts_with(
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        ));
        assert!(p.ends_with("Joke?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"));
    }

    #[test]
    fn custom_and_choice() {
        let t = ChatTemplate::Custom("{{system}}\n---\n{{prompt}}".into());
        assert_eq!(
            render(&t, &turns()),
            "Be brief.\n---\nUser: Hi\nAssistant: Hello!\nUser: Joke?\nAssistant:"
        );
        assert_eq!(
            choose(None, "meta/meta-llama-3-8b-instruct"),
            ChatTemplate::Llama3
        );
        assert_eq!(
            choose(None, "mistralai/mixtral-8x7b-instruct-v0.1"),
            ChatTemplate::Mistral
        );
        assert_eq!(
            choose(Some(&ChatTemplate::Llama3), "mistralai/x"),
            ChatTemplate::Llama3
        );
    }
}
