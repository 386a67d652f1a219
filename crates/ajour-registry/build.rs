// `sqlx::migrate!` embeds the files in `migrations/` at compile time, but Cargo does not know it
// reads them: without this, a migration added or changed alone is left out of the build.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
