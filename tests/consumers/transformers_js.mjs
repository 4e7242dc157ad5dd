// Loads a bundle with transformers.js (the npm package @huggingface/transformers) from a
// Hub-compatible server, for each dtype: logits of the prompt and greedy tokens.
// Usage: node transformers_js.mjs '{"host": ..., "repo": ..., "cache_dir": ..., "prompt": [...], "steps": N, "dtypes": [...]}'
import { AutoModelForCausalLM, Tensor, env } from '@huggingface/transformers';

const args = JSON.parse(process.argv[2]);
env.remoteHost = args.host.endsWith('/') ? args.host : args.host + '/';
env.allowLocalModels = false;  // only the server: a local folder must not satisfy the load
env.allowRemoteModels = true;
env.cacheDir = args.cache_dir;

const ids = (list) => new Tensor('int64', BigInt64Array.from(list.map(BigInt)), [1, list.length]);
const out = { version: env.version, results: {} };
for (const dtype of args.dtypes) {  // null: no dtype, so config.json's transformers.js_config decides
  const options = dtype === null ? {} : { dtype };
  const model = await AutoModelForCausalLM.from_pretrained(args.repo, options);
  const input_ids = ids(args.prompt);
  const attention_mask = ids(args.prompt.map(() => 1));
  const { logits } = await model({ input_ids, attention_mask });
  const vocab = logits.dims[2];
  const last = Array.from(logits.data.slice((args.prompt.length - 1) * vocab, args.prompt.length * vocab), Number);
  const sequences = await model.generate({ input_ids, attention_mask, max_new_tokens: args.steps, do_sample: false });
  const tokens = Array.from(sequences.data, Number).slice(args.prompt.length);
  out.results[dtype ?? 'default'] = { logits_last: last, tokens };
  await model.dispose();
}
console.log(JSON.stringify(out));
