//! Prints the first step's top-5 logits for a prompt (a debugging aid).
use std::sync::Arc;
fn main() {
    let a: Vec<String> = std::env::args().collect();
    let model = strata_engine::Model::load(std::path::Path::new(&a[1])).unwrap();
    let pool = Arc::new(strata_simd::pool::ThreadPool::new(2));
    let mut ctx = model.new_context(256, pool);
    let toks = model.tokenizer.encode(&a[2], true, true);
    let l = model
        .forward(&mut ctx, &toks, strata_engine::Logits::Last)
        .unwrap();
    let mut idx: Vec<usize> = (0..l.len()).collect();
    idx.sort_by(|&x, &y| l[y].total_cmp(&l[x]));
    for &i in &idx[..5] {
        println!("{i} {:.5}", l[i]);
    }
    for i in a[3..].iter() {
        let i: usize = i.parse().unwrap();
        println!("ref {i} {:.5}", l[i]);
    }
}
