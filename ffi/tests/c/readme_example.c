/* Loads the zero-trust example, checks a connection, prints who decided.
 *
 * Build: cc -std=c99 example.c -Iffi/include -Ltarget/release -lpalisade \
 *          -Wl,-rpath,$PWD/target/release
 * Run:   ./a.out examples/zero-trust/[0-9]*.yaml
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "palisade.h"

/* Reads a whole file; the caller frees it. */
static char *slurp(const char *path, size_t *len) {
  FILE *f = fopen(path, "rb");
  char *buf = NULL;
  long n;
  if (f != NULL && fseek(f, 0, SEEK_END) == 0 && (n = ftell(f)) >= 0 &&
      fseek(f, 0, SEEK_SET) == 0 && (buf = malloc((size_t)n + 1)) != NULL) {
    *len = fread(buf, 1, (size_t)n, f);
  }
  if (f != NULL) fclose(f);
  return buf;
}

/* Prints a failed call's error and frees it. */
static int fail(const char *what, palisade_error *err) {
  fprintf(stderr, "%s: %s\n", what, err != NULL ? err->message.ptr : "?");
  palisade_error_free(err);
  return 1;
}

static void print_side(const char *side, const palisade_decision *d) {
  if (!d->present) {
    printf("  %s: not a pod, no policy\n", side);
    return;
  }
  /* Strings come with a length and a terminating NUL. */
  printf("  %s at %s: %s by tier %s, %s, rule %lld (%s)\n", side, d->endpoint.ptr,
         d->allowed ? "allowed" : "denied", d->tier.ptr,
         d->policy.len > 0 ? d->policy.ptr : d->kind.ptr, (long long)d->rule, d->action.ptr);
}

int main(int argc, char **argv) {
  palisade_engine *engine = NULL;
  palisade_error *err = NULL;
  palisade_verdict *verdict = NULL;
  palisade_connection conn;
  int i;

  if (palisade_engine_new(NULL, 0, &engine, &err) != PALISADE_OK) return fail("engine", err);

  /* Stage every manifest file, then apply them in one atomic batch. */
  for (i = 1; i < argc; i++) {
    size_t len = 0;
    char *text = slurp(argv[i], &len);
    palisade_status s;
    if (text == NULL) {
      fprintf(stderr, "cannot read %s\n", argv[i]);
      palisade_engine_free(engine);
      return 1;
    }
    s = palisade_load_manifests(engine, argv[i], strlen(argv[i]), text, len, &err);
    free(text);
    if (s != PALISADE_OK) {
      palisade_engine_free(engine);
      return fail("load", err); /* names the file, document, object and field */
    }
  }
  if (palisade_apply(engine, NULL, &err) != PALISADE_OK) {
    palisade_engine_free(engine);
    return fail("apply", err);
  }

  /* May shop-frontend/web open TCP port 8080 on shop-backend/api? */
  memset(&conn, 0, sizeof conn);
  conn.struct_size = sizeof conn;
  conn.src = "shop-frontend/web";
  conn.src_len = strlen(conn.src);
  conn.dst = "shop-backend/api";
  conn.dst_len = strlen(conn.dst);
  conn.protocol = 6; /* TCP */
  conn.dst_port = 8080;
  conn.icmp_type = -1;
  conn.icmp_code = -1;
  if (palisade_check(engine, &conn, &verdict, &err) != PALISADE_OK) {
    palisade_engine_free(engine);
    return fail("check", err);
  }
  printf("%s: %s\n", verdict->flow.ptr, verdict->allowed ? "ALLOWED" : "DENIED");
  print_side("egress", &verdict->egress);
  print_side("ingress", &verdict->ingress);

  palisade_verdict_free(verdict);
  palisade_engine_free(engine);
  return 0;
}
