//! The CustomResourceDefinition as installed into clusters, rendered from the api crate's types.

use kube::CustomResourceExt;
use securemail_api::SecureMailTenant;
use serde_json::Value;

use crate::{Error, Result};

/// The SecureMailTenant CRD as YAML, byte-identical for the same code.
pub fn crd_yaml() -> Result<String> {
    let mut crd = serde_json::to_value(SecureMailTenant::crd()).map_err(|source| Error::Serialize {
        what: "the SecureMailTenant CRD",
        source,
    })?;
    unwrap_descriptions(&mut crd);
    Ok(serde_yaml::to_string(&crd)?)
}

/// Doc comments are wrapped at the source's line width; `kubectl explain` re-wraps text itself, so hard line
/// breaks inside a paragraph only break sentences apart. Paragraph breaks (blank lines) are kept.
fn unwrap_descriptions(value: &mut Value) {
    match value {
        Value::Object(map) => {
            for (key, child) in map.iter_mut() {
                match child {
                    Value::String(text) if key == "description" => *text = unwrap_paragraphs(text),
                    _ => unwrap_descriptions(child),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(unwrap_descriptions),
        _ => {}
    }
}

fn unwrap_paragraphs(text: &str) -> String {
    text.split("\n\n")
        .map(|paragraph| paragraph.lines().map(str::trim).collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join("\n\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paragraphs_are_unwrapped_and_kept_apart() {
        assert_eq!(unwrap_paragraphs("one\ntwo\n\nthree"), "one two\n\nthree");
    }

    #[test]
    fn descriptions_inside_the_schema_are_unwrapped() {
        let yaml = crd_yaml().expect("CRD renders");
        let crd: Value = serde_yaml::from_str(&yaml).expect("CRD parses back");
        let tls =
            &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["tlsPolicy"];
        let description = tls["description"].as_str().expect("tlsPolicy is documented");
        assert!(!description.contains('\n'), "{description:?}");
        assert!(description.contains("cleartext for one domain"), "{description:?}");
    }

    #[test]
    fn rendering_is_deterministic() {
        assert_eq!(crd_yaml().expect("renders"), crd_yaml().expect("renders"));
    }
}
