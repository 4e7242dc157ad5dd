/* A small port of karpathy/llama2.c run.c for the tests: the v0 checkpoint layout
 * (memory_map_weights), forward() in fp32, the tokenizer.bin reader, encode() with the
 * dummy prefix, byte fallback and score-ordered merges, decode() + safe_printf(), and
 * generate() with temperature 0 (sample_argmax). Re-typed from run.c's published
 * algorithm; sampling, chat mode, mmap and OpenMP are left out.
 *
 *   llama2c_run generate MODEL.bin TOKENIZER.bin MAX_NEW_TOKENS PROMPT
 *       line 1: prompt ids (BOS first), line 2: the greedy ids, then run.c's printed text
 *   llama2c_run encode TOKENIZER.bin VOCAB_SIZE TEXTS
 *       TEXTS holds NUL-terminated strings; one line of ids (BOS first) per string
 */
#include <ctype.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct { int dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len; } Config;
typedef struct {
    float *tok, *rms_att, *wq, *wk, *wv, *wo, *rms_ffn, *w1, *w2, *w3, *rms_final, *wcls;
} Weights;
typedef struct { float *x, *xb, *xb2, *hb, *hb2, *q, *att, *logits, *key_cache, *value_cache; } State;
typedef struct { char *str; int id; } TokenIndex;
typedef struct {
    char **vocab; float *scores; TokenIndex *sorted; int vocab_size;
    unsigned int max_token_length; unsigned char byte_pieces[512];
} Tokenizer;

static void die(const char *msg) { fprintf(stderr, "%s\n", msg); exit(1); }

static float *read_checkpoint(const char *path, Config *p, Weights *w) {
    FILE *f = fopen(path, "rb");
    if (!f) die("cannot open checkpoint");
    if (fread(p, sizeof(Config), 1, f) != 1) die("short header");
    int shared = p->vocab_size > 0;
    p->vocab_size = abs(p->vocab_size);
    fseek(f, 0, SEEK_END);
    long size = ftell(f) - (long)sizeof(Config);
    fseek(f, sizeof(Config), SEEK_SET);
    float *data = malloc(size);
    if (fread(data, 1, size, f) != (size_t)size) die("short checkpoint");
    fclose(f);
    long hs = p->dim / p->n_heads, L = p->n_layers, d = p->dim;
    float *ptr = data;
    w->tok = ptr; ptr += (long)p->vocab_size * d;
    w->rms_att = ptr; ptr += L * d;
    w->wq = ptr; ptr += L * d * (p->n_heads * hs);
    w->wk = ptr; ptr += L * d * (p->n_kv_heads * hs);
    w->wv = ptr; ptr += L * d * (p->n_kv_heads * hs);
    w->wo = ptr; ptr += L * (p->n_heads * hs) * d;
    w->rms_ffn = ptr; ptr += L * d;
    w->w1 = ptr; ptr += L * d * p->hidden_dim;
    w->w2 = ptr; ptr += L * p->hidden_dim * d;
    w->w3 = ptr; ptr += L * d * p->hidden_dim;
    w->rms_final = ptr; ptr += d;
    ptr += p->seq_len * hs / 2;  /* freq_cis_real, unused */
    ptr += p->seq_len * hs / 2;  /* freq_cis_imag, unused */
    w->wcls = shared ? w->tok : ptr;
    return data;
}

static void rmsnorm(float *o, const float *x, const float *weight, int size) {
    float ss = 0.0f;
    for (int j = 0; j < size; j++) ss += x[j] * x[j];
    ss /= size;
    ss += 1e-5f;
    ss = 1.0f / sqrtf(ss);
    for (int j = 0; j < size; j++) o[j] = weight[j] * (ss * x[j]);
}

static void softmax(float *x, int size) {
    float max_val = x[0];
    for (int i = 1; i < size; i++) if (x[i] > max_val) max_val = x[i];
    float sum = 0.0f;
    for (int i = 0; i < size; i++) { x[i] = expf(x[i] - max_val); sum += x[i]; }
    for (int i = 0; i < size; i++) x[i] /= sum;
}

static void matmul(float *xout, const float *x, const float *w, int n, int d) {
    for (int i = 0; i < d; i++) {
        float val = 0.0f;
        for (int j = 0; j < n; j++) val += w[i * n + j] * x[j];
        xout[i] = val;
    }
}

static float *forward(Config *p, Weights *w, State *s, int token, int pos) {
    int dim = p->dim, kv_dim = (p->dim * p->n_kv_heads) / p->n_heads, kv_mul = p->n_heads / p->n_kv_heads;
    int hidden_dim = p->hidden_dim, head_size = dim / p->n_heads;
    float *x = s->x;
    memcpy(x, w->tok + (long)token * dim, dim * sizeof(float));
    for (long l = 0; l < p->n_layers; l++) {
        rmsnorm(s->xb, x, w->rms_att + l * dim, dim);
        long loff = l * p->seq_len * kv_dim;
        float *k = s->key_cache + loff + pos * kv_dim, *v = s->value_cache + loff + pos * kv_dim;
        matmul(s->q, s->xb, w->wq + l * dim * dim, dim, dim);
        matmul(k, s->xb, w->wk + l * dim * kv_dim, dim, kv_dim);
        matmul(v, s->xb, w->wv + l * dim * kv_dim, dim, kv_dim);
        for (int i = 0; i < dim; i += 2) {  /* RoPE on interleaved pairs */
            int head_dim = i % head_size;
            float freq = 1.0f / powf(10000.0f, head_dim / (float)head_size);
            float val = pos * freq, fcr = cosf(val), fci = sinf(val);
            int rotn = i < kv_dim ? 2 : 1;
            for (int r = 0; r < rotn; r++) {
                float *vec = r == 0 ? s->q : k;
                float v0 = vec[i], v1 = vec[i + 1];
                vec[i] = v0 * fcr - v1 * fci;
                vec[i + 1] = v0 * fci + v1 * fcr;
            }
        }
        for (int h = 0; h < p->n_heads; h++) {
            float *q = s->q + h * head_size, *att = s->att + h * p->seq_len;
            for (int t = 0; t <= pos; t++) {
                float *kt = s->key_cache + loff + t * kv_dim + (h / kv_mul) * head_size;
                float score = 0.0f;
                for (int i = 0; i < head_size; i++) score += q[i] * kt[i];
                att[t] = score / sqrtf(head_size);
            }
            softmax(att, pos + 1);
            float *xb = s->xb + h * head_size;
            memset(xb, 0, head_size * sizeof(float));
            for (int t = 0; t <= pos; t++) {
                float *vt = s->value_cache + loff + t * kv_dim + (h / kv_mul) * head_size;
                for (int i = 0; i < head_size; i++) xb[i] += att[t] * vt[i];
            }
        }
        matmul(s->xb2, s->xb, w->wo + l * dim * dim, dim, dim);
        for (int i = 0; i < dim; i++) x[i] += s->xb2[i];
        rmsnorm(s->xb, x, w->rms_ffn + l * dim, dim);
        matmul(s->hb, s->xb, w->w1 + l * dim * hidden_dim, dim, hidden_dim);
        matmul(s->hb2, s->xb, w->w3 + l * dim * hidden_dim, dim, hidden_dim);
        for (int i = 0; i < hidden_dim; i++) {  /* SwiGLU */
            float val = s->hb[i];
            val *= (1.0f / (1.0f + expf(-val)));
            s->hb[i] = val * s->hb2[i];
        }
        matmul(s->xb, s->hb, w->w2 + l * dim * hidden_dim, hidden_dim, dim);
        for (int i = 0; i < dim; i++) x[i] += s->xb[i];
    }
    rmsnorm(x, x, w->rms_final, dim);
    matmul(s->logits, x, w->wcls, p->dim, p->vocab_size);
    return s->logits;
}

static int compare_tokens(const void *a, const void *b) {
    return strcmp(((const TokenIndex *)a)->str, ((const TokenIndex *)b)->str);
}

static void build_tokenizer(Tokenizer *t, const char *path, int vocab_size) {
    t->vocab_size = vocab_size;
    t->vocab = malloc(vocab_size * sizeof(char *));
    t->scores = malloc(vocab_size * sizeof(float));
    for (int i = 0; i < 256; i++) { t->byte_pieces[i * 2] = (unsigned char)i; t->byte_pieces[i * 2 + 1] = '\0'; }
    FILE *f = fopen(path, "rb");
    if (!f) die("cannot open tokenizer");
    if (fread(&t->max_token_length, sizeof(int), 1, f) != 1) die("failed read");
    int len;
    for (int i = 0; i < vocab_size; i++) {
        if (fread(t->scores + i, sizeof(float), 1, f) != 1) die("failed read");
        if (fread(&len, sizeof(int), 1, f) != 1) die("failed read");
        t->vocab[i] = malloc(len + 1);
        if (len && fread(t->vocab[i], len, 1, f) != 1) die("failed read");
        t->vocab[i][len] = '\0';
    }
    fclose(f);
    t->sorted = malloc(vocab_size * sizeof(TokenIndex));
    for (int i = 0; i < vocab_size; i++) { t->sorted[i].str = t->vocab[i]; t->sorted[i].id = i; }
    qsort(t->sorted, vocab_size, sizeof(TokenIndex), compare_tokens);
}

static int str_lookup(char *str, Tokenizer *t) {
    TokenIndex key = {.str = str};
    TokenIndex *res = bsearch(&key, t->sorted, t->vocab_size, sizeof(TokenIndex), compare_tokens);
    return res ? res->id : -1;
}

static void encode(Tokenizer *t, const char *text, int *tokens, int *n_tokens) {
    char *buf = malloc(t->max_token_length * 2 + 1 + 2);
    size_t str_len = 0;
    *n_tokens = 0;
    tokens[(*n_tokens)++] = 1;  /* BOS */
    if (text[0] != '\0') tokens[(*n_tokens)++] = str_lookup(" ", t);  /* add_dummy_prefix */
    for (const char *c = text; *c != '\0'; c++) {
        if ((*c & 0xC0) != 0x80) str_len = 0;  /* not a continuation byte: a new codepoint */
        buf[str_len++] = *c;
        buf[str_len] = '\0';
        if ((*(c + 1) & 0xC0) == 0x80 && str_len < 4) continue;
        int id = str_lookup(buf, t);
        if (id != -1) {
            tokens[(*n_tokens)++] = id;
        } else {  /* byte fallback: <unk>, <s>, </s> come first */
            for (size_t i = 0; i < str_len; i++) tokens[(*n_tokens)++] = (unsigned char)buf[i] + 3;
        }
        str_len = 0;
    }
    while (1) {  /* merge the best-scoring consecutive pair, leftmost on ties */
        float best_score = -1e10;
        int best_id = -1, best_idx = -1;
        for (int i = 0; i < *n_tokens - 1; i++) {
            sprintf(buf, "%s%s", t->vocab[tokens[i]], t->vocab[tokens[i + 1]]);
            int id = str_lookup(buf, t);
            if (id != -1 && t->scores[id] > best_score) { best_score = t->scores[id]; best_id = id; best_idx = i; }
        }
        if (best_idx == -1) break;
        tokens[best_idx] = best_id;
        for (int i = best_idx + 1; i < *n_tokens - 1; i++) tokens[i] = tokens[i + 1];
        (*n_tokens)--;
    }
    free(buf);
}

static char *decode(Tokenizer *t, int prev_token, int token) {
    char *piece = t->vocab[token];
    if (prev_token == 1 && piece[0] == ' ') piece++;  /* sentencepiece strips the space after BOS */
    unsigned char byte_val;
    if (sscanf(piece, "<0x%02hhX>", &byte_val) == 1) piece = (char *)t->byte_pieces + byte_val * 2;
    return piece;
}

static void safe_printf(const char *piece) {
    if (piece == NULL || piece[0] == '\0') return;
    if (piece[1] == '\0') {
        unsigned char byte_val = piece[0];
        if (!(isprint(byte_val) || isspace(byte_val))) return;
    }
    printf("%s", piece);
}

static int argmax(const float *v, int n) {
    int max_i = 0;
    for (int i = 1; i < n; i++) if (v[i] > v[max_i]) max_i = i;
    return max_i;
}

static int generate(const char *model, const char *tok_path, int max_new, const char *prompt) {
    Config p; Weights w; State s; Tokenizer t;
    read_checkpoint(model, &p, &w);
    build_tokenizer(&t, tok_path, p.vocab_size);
    int kv_dim = (p.dim * p.n_kv_heads) / p.n_heads;
    s.x = calloc(p.dim, 4); s.xb = calloc(p.dim, 4); s.xb2 = calloc(p.dim, 4); s.q = calloc(p.dim, 4);
    s.hb = calloc(p.hidden_dim, 4); s.hb2 = calloc(p.hidden_dim, 4); s.logits = calloc(p.vocab_size, 4);
    s.att = calloc(p.n_heads * p.seq_len, 4);
    s.key_cache = calloc((long)p.n_layers * p.seq_len * kv_dim, 4);
    s.value_cache = calloc((long)p.n_layers * p.seq_len * kv_dim, 4);
    int *prompt_tokens = malloc((strlen(prompt) + 3) * sizeof(int)), n_prompt = 0;
    encode(&t, prompt, prompt_tokens, &n_prompt);
    int steps = n_prompt - 1 + max_new;  /* run.c's -n counts prompt positions too */
    if (steps > p.seq_len) die("prompt + new tokens exceed seq_len");
    for (int i = 0; i < n_prompt; i++) printf("%d%c", prompt_tokens[i], i + 1 < n_prompt ? ' ' : '\n');
    int *out = malloc(steps * sizeof(int)), n_out = 0;
    char *text = NULL; size_t text_len = 0;
    FILE *saved = stdout;
    stdout = open_memstream(&text, &text_len);  /* the text goes after the id lines */
    int token = prompt_tokens[0], next, pos = 0;
    while (pos < steps) {
        float *logits = forward(&p, &w, &s, token, pos);
        next = pos < n_prompt - 1 ? prompt_tokens[pos + 1] : argmax(logits, p.vocab_size);
        if (pos >= n_prompt - 1) out[n_out++] = next;
        pos++;
        if (next == 1) break;  /* BOS delimits sequences */
        safe_printf(decode(&t, token, next));
        token = next;
    }
    fclose(stdout);
    stdout = saved;
    for (int i = 0; i < n_out; i++) printf("%d%c", out[i], i + 1 < n_out ? ' ' : '\n');
    fwrite(text, 1, text_len, stdout);
    return 0;
}

static int encode_file(const char *tok_path, int vocab_size, const char *texts) {
    Tokenizer t;
    build_tokenizer(&t, tok_path, vocab_size);
    FILE *f = fopen(texts, "rb");
    if (!f) die("cannot open texts");
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *data = malloc(size + 1);
    if (fread(data, 1, size, f) != (size_t)size) die("short texts");
    data[size] = '\0';
    int *tokens = malloc((size + 3) * sizeof(int)), n;
    for (char *text = data; text < data + size; text += strlen(text) + 1) {
        encode(&t, text, tokens, &n);
        for (int i = 0; i < n; i++) printf("%d%c", tokens[i], i + 1 < n ? ' ' : '\n');
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 6 && strcmp(argv[1], "generate") == 0) return generate(argv[2], argv[3], atoi(argv[4]), argv[5]);
    if (argc == 5 && strcmp(argv[1], "encode") == 0) return encode_file(argv[2], atoi(argv[3]), argv[4]);
    die("usage: llama2c_run generate MODEL TOKENIZER MAX_NEW PROMPT | encode TOKENIZER VOCAB_SIZE TEXTS");
    return 1;
}
