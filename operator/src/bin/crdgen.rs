//! Prints the SecureMailTenant CRD (`make crds` writes it to crds/).
fn main() -> anyhow::Result<()> {
    print!("{}", securemail_operator::crd::crd_yaml()?);
    Ok(())
}
