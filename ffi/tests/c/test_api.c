/*
 * Every function of libpalisade and every error path a caller can reach:
 * NULL pointers, invalid UTF-8, bad YAML/JSON, invalid values, wrong
 * struct sizes and lengths, unknown endpoints and interfaces, freed and
 * made-up handles, double frees. Run by ffi/tests/c_api.rs natively and
 * under valgrind.
 *
 * Usage: test_api EXAMPLES_DIR   (the zero-trust example directory)
 * The datapath part attaches to the interface named by PALISADE_TEST_IFACE
 * when it is set (the harness makes a veth pair in a private netns).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "palisade.h"

static int passed, failed;

#define CHECK(cond)                                                            \
  do {                                                                         \
    if (cond) {                                                                \
      passed++;                                                                \
    } else {                                                                   \
      failed++;                                                                \
      fprintf(stderr, "%s:%d: FAILED: %s\n", __FILE__, __LINE__, #cond);     \
    }                                                                          \
  } while (0)

/* A string literal as (pointer, length). */
#define S(lit) (lit), (sizeof(lit) - 1)

static int str_eq(palisade_str s, const char *want) {
  return s.ptr != NULL && s.len == strlen(want) && memcmp(s.ptr, want, s.len) == 0 &&
         s.ptr[s.len] == '\0';
}

static int contains(const char *haystack, size_t len, const char *needle) {
  size_t n = strlen(needle);
  size_t i;
  if (haystack == NULL || n > len) return 0;
  for (i = 0; i + n <= len; i++)
    if (memcmp(haystack + i, needle, n) == 0) return 1;
  return 0;
}

static int str_contains(palisade_str s, const char *needle) {
  return contains(s.ptr, s.len, needle);
}

/* Checks that a call failed with `want`, that the error says so and
 * mentions `needle`, and frees it. */
static void expect_error(palisade_status got, palisade_error *err, palisade_status want,
                         const char *needle, int line) {
  int ok = got == want && err != NULL && err->code == want && err->message.len > 0 &&
           err->message.ptr[err->message.len] == '\0' &&
           (needle == NULL || str_contains(err->message, needle));
  if (ok) {
    passed++;
  } else {
    failed++;
    fprintf(stderr, "line %d: expected status %d mentioning \"%s\", got %d: %s\n", line,
            (int)want, needle ? needle : "", (int)got, err ? err->message.ptr : "(no error)");
  }
  CHECK(palisade_error_free(err) == PALISADE_OK);
}
#define EXPECT_ERR(call, want, needle)                                         \
  do {                                                                         \
    palisade_error *e_ = NULL;                                                 \
    palisade_status s_ = (call);                                               \
    expect_error(s_, e_, (want), (needle), __LINE__);                          \
  } while (0)
/* Inside EXPECT_ERR, ERR is the error out-parameter to pass to the call. */
#define ERR (&e_)

static char *read_file(const char *path, size_t *len) {
  FILE *f = fopen(path, "rb");
  char *buf;
  long n;
  if (f == NULL) return NULL;
  fseek(f, 0, SEEK_END);
  n = ftell(f);
  fseek(f, 0, SEEK_SET);
  buf = malloc((size_t)n + 1);
  if (buf != NULL && fread(buf, 1, (size_t)n, f) != (size_t)n) {
    free(buf);
    buf = NULL;
  }
  fclose(f);
  if (buf != NULL) {
    buf[n] = '\0';
    *len = (size_t)n;
  }
  return buf;
}

static palisade_connection connection(const char *src, const char *dst, uint32_t protocol,
                                      uint16_t dst_port) {
  palisade_connection c;
  memset(&c, 0, sizeof c);
  c.struct_size = sizeof c;
  c.src = src;
  c.src_len = strlen(src);
  c.dst = dst;
  c.dst_len = strlen(dst);
  c.protocol = protocol;
  c.dst_port = dst_port;
  c.icmp_type = -1;
  c.icmp_code = -1;
  return c;
}

static void test_version_and_status(void) {
  palisade_str v = palisade_version();
  int code;
  CHECK(v.ptr != NULL && v.len > 0 && v.ptr[v.len] == '\0');
  CHECK(strchr(v.ptr, '.') != NULL);
  CHECK(PALISADE_ABI_VERSION == 1);
  for (code = PALISADE_OK; code <= PALISADE_ERR_PANIC; code++) {
    palisade_str s = palisade_status_str(code);
    CHECK(s.len > 0 && s.ptr[s.len] == '\0' && str_contains(s, "PALISADE_"));
  }
  CHECK(str_contains(palisade_status_str(PALISADE_ERR_BAD_HANDLE), "BAD_HANDLE"));
  CHECK(str_eq(palisade_status_str(42), "unknown status code"));
  CHECK(str_eq(palisade_status_str(-1), "unknown status code"));
}

static void test_engine_lifecycle(void) {
  palisade_engine *e = NULL;
  palisade_engine *fake = (palisade_engine *)(uintptr_t)0x1230;

  EXPECT_ERR(palisade_engine_new(NULL, 0, NULL, ERR), PALISADE_ERR_NULL, "out");
  EXPECT_ERR(palisade_engine_new(NULL, 5, &e, ERR), PALISADE_ERR_NULL, "node_name");
  CHECK(e == NULL);
  EXPECT_ERR(palisade_engine_new(S("node\xff"), &e, ERR), PALISADE_ERR_UTF8, "node_name");
  EXPECT_ERR(palisade_engine_new("n", SIZE_MAX, &e, ERR), PALISADE_ERR_SIZE, "PTRDIFF_MAX");

  /* err may be NULL: only the status is reported. */
  CHECK(palisade_engine_new(NULL, 0, NULL, NULL) == PALISADE_ERR_NULL);
  CHECK(palisade_engine_new(S("node-1"), &e, NULL) == PALISADE_OK);
  CHECK(e != NULL);
  CHECK(palisade_engine_free(e) == PALISADE_OK);

  /* Freed, made-up and NULL handles. */
  CHECK(palisade_engine_free(e) == PALISADE_ERR_BAD_HANDLE);
  CHECK(palisade_engine_free(fake) == PALISADE_ERR_BAD_HANDLE);
  CHECK(palisade_engine_free(NULL) == PALISADE_ERR_NULL);
  EXPECT_ERR(palisade_apply(e, NULL, ERR), PALISADE_ERR_BAD_HANDLE, "not live");
  EXPECT_ERR(palisade_apply(fake, NULL, ERR), PALISADE_ERR_BAD_HANDLE, "not live");
  EXPECT_ERR(palisade_apply(NULL, NULL, ERR), PALISADE_ERR_NULL, "engine");
  EXPECT_ERR(palisade_load_manifests(e, NULL, 0, S("{}"), ERR), PALISADE_ERR_BAD_HANDLE, NULL);
  EXPECT_ERR(palisade_upsert_endpoint(e, S("{}"), ERR), PALISADE_ERR_BAD_HANDLE, NULL);
  EXPECT_ERR(palisade_delete_endpoint(e, S("a"), S("b"), ERR), PALISADE_ERR_BAD_HANDLE, NULL);
  {
    palisade_connection c = connection("a/b", "a/c", 6, 80);
    palisade_verdict *v = NULL;
    palisade_string s = {NULL, 0};
    EXPECT_ERR(palisade_check(e, &c, &v, ERR), PALISADE_ERR_BAD_HANDLE, NULL);
    CHECK(v == NULL);
    EXPECT_ERR(palisade_export_maps(e, &s, ERR), PALISADE_ERR_BAD_HANDLE, NULL);
    CHECK(s.ptr == NULL);
  }
  EXPECT_ERR(palisade_attach(e, S("lo"), NULL, 0, ERR), PALISADE_ERR_BAD_HANDLE, NULL);
  EXPECT_ERR(palisade_detach(e, S("lo"), ERR), PALISADE_ERR_BAD_HANDLE, NULL);
  {
    uint64_t removed = 0;
    EXPECT_ERR(palisade_expire_conntrack(e, &removed, ERR), PALISADE_ERR_BAD_HANDLE, NULL);
  }
  EXPECT_ERR(palisade_set_local_endpoint(e, S("10.10.1.10"), NULL, 0, NULL, ERR),
             PALISADE_ERR_BAD_HANDLE, NULL);
}

static int load_examples(palisade_engine *e, const char *dir) {
  static const char *files[] = {"00-namespaces.yaml", "10-pods.yaml", "20-default-deny.yaml",
                                "30-shop.yaml"};
  size_t i;
  for (i = 0; i < sizeof files / sizeof files[0]; i++) {
    char path[4096];
    size_t len = 0;
    char *text;
    palisade_error *error = NULL;
    palisade_status s;
    snprintf(path, sizeof path, "%s/%s", dir, files[i]);
    text = read_file(path, &len);
    if (text == NULL) {
      fprintf(stderr, "cannot read %s\n", path);
      return 0;
    }
    s = palisade_load_manifests(e, files[i], strlen(files[i]), text, len, &error);
    free(text);
    if (s != PALISADE_OK) {
      fprintf(stderr, "loading %s: %s\n", path, error->message.ptr);
      palisade_error_free(error);
      return 0;
    }
    CHECK(error == NULL);
  }
  return 1;
}

static void test_manifest_errors(palisade_engine *e) {
  palisade_error *error = NULL;
  palisade_status s;

  EXPECT_ERR(palisade_load_manifests(e, NULL, 0, NULL, 0, ERR), PALISADE_ERR_NULL, "text");
  EXPECT_ERR(palisade_load_manifests(e, NULL, 3, S("{}"), ERR), PALISADE_ERR_NULL, "source");
  EXPECT_ERR(palisade_load_manifests(e, NULL, 0, "x", SIZE_MAX, ERR), PALISADE_ERR_SIZE, "text");
  EXPECT_ERR(palisade_load_manifests(e, NULL, 0, S("kind: \"\xc3\x28\"\n"), ERR),
             PALISADE_ERR_UTF8, "text");
  EXPECT_ERR(palisade_load_manifests(e, S("\xfe.yaml"), S("{}"), ERR), PALISADE_ERR_UTF8,
             "source");
  /* Empty buffer: nothing to load. */
  CHECK(palisade_load_manifests(e, NULL, 0, "", 0, NULL) == PALISADE_OK);

  /* YAML syntax, with the source and document named. */
  s = palisade_load_manifests(
      e, S("bad.yaml"),
      S("apiVersion: v1\nkind: Namespace\nmetadata: {name: ok}\n---\nkind: [unclosed\n"),
      &error);
  CHECK(s == PALISADE_ERR_PARSE);
  CHECK(error != NULL && error->code == PALISADE_ERR_PARSE);
  if (error != NULL) {
    CHECK(str_eq(error->source, "bad.yaml"));
    CHECK(error->document == 2);
    CHECK(str_contains(error->message, "bad.yaml:6:1: malformed YAML"));
  }
  CHECK(palisade_error_free(error) == PALISADE_OK);

  /* JSON syntax. */
  EXPECT_ERR(palisade_load_manifests(e, S("bad.json"), S("{\"kind\": \"Namespace\","), ERR),
             PALISADE_ERR_PARSE, "JSON");
  /* Unknown kind; a document that is not an object. */
  EXPECT_ERR(palisade_load_manifests(e, NULL, 0, S("apiVersion: v1\nkind: Gadget\nmetadata: {name: g}\n"), ERR),
             PALISADE_ERR_PARSE, "Gadget");
  EXPECT_ERR(palisade_load_manifests(e, NULL, 0, S("[1, 2]"), ERR), PALISADE_ERR_INVALID,
             "must be an object");

  /* An invalid selector: the object and the field are named. */
  error = NULL;
  s = palisade_load_manifests(
      e, S("policy.yaml"),
      S("apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\n"
        "metadata: {name: broken, namespace: shop-backend}\nspec: {selector: \"app ==\"}\n"),
      &error);
  CHECK(s == PALISADE_ERR_INVALID);
  if (error != NULL) {
    CHECK(str_eq(error->object_kind, "NetworkPolicy"));
    CHECK(str_eq(error->object_namespace, "shop-backend"));
    CHECK(str_eq(error->object_name, "broken"));
    CHECK(str_eq(error->field, "spec.selector"));
    CHECK(str_eq(error->source, "policy.yaml"));
    CHECK(error->document == 1);
  }
  CHECK(palisade_error_free(error) == PALISADE_OK);

  /* Duplicates within one buffer; a missing tier (named with its origin). */
  EXPECT_ERR(palisade_load_manifests(e, S("dup.yaml"),
                                     S("apiVersion: v1\nkind: Namespace\nmetadata: {name: d}\n---\n"
                                       "apiVersion: v1\nkind: Namespace\nmetadata: {name: d}\n"),
                                     ERR),
             PALISADE_ERR_INVALID, "duplicate");
  EXPECT_ERR(palisade_load_manifests(e, S("tier.yaml"),
                                     S("apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\n"
                                       "metadata: {name: t}\nspec: {tier: nowhere, selector: all()}\n"),
                                     ERR),
             PALISADE_ERR_INVALID, "tier.yaml:1:1: GlobalNetworkPolicy t");

  /* None of that was staged: an apply changes nothing. */
  {
    palisade_string delta = {NULL, 0};
    CHECK(palisade_apply(e, &delta, NULL) == PALISADE_OK);
    CHECK(contains(delta.ptr, delta.len, "\"changed\":false"));
    CHECK(palisade_string_free(&delta) == PALISADE_OK);
  }
}

static void test_endpoint_errors(palisade_engine *e) {
  palisade_error *error = NULL;
  palisade_status s;

  EXPECT_ERR(palisade_upsert_endpoint(e, NULL, 0, ERR), PALISADE_ERR_NULL, "json");
  EXPECT_ERR(palisade_upsert_endpoint(e, S("{\"namespace\": \"a\xff\", \"name\": \"b\"}"), ERR),
             PALISADE_ERR_UTF8, "json");
  EXPECT_ERR(palisade_upsert_endpoint(e, S("{\"namespace\": \"a\", "), ERR), PALISADE_ERR_PARSE,
             "JSON");
  EXPECT_ERR(palisade_upsert_endpoint(e, S("{\"name\": \"b\"}"), ERR), PALISADE_ERR_PARSE,
             "namespace");
  EXPECT_ERR(palisade_upsert_endpoint(e, "{}", SIZE_MAX, ERR), PALISADE_ERR_SIZE, "json");

  s = palisade_upsert_endpoint(e, S("{\"namespace\": \"a\", \"name\": \"b\", \"colour\": 1}"),
                               &error);
  CHECK(s == PALISADE_ERR_PARSE);
  if (error != NULL) CHECK(str_contains(error->message, "colour"));
  CHECK(palisade_error_free(error) == PALISADE_OK);

  error = NULL;
  s = palisade_upsert_endpoint(
      e, S("{\"namespace\": \"a\", \"name\": \"b\", \"ips\": [\"10.0.0.1\", \"10.0.0.300\"]}"),
      &error);
  CHECK(s == PALISADE_ERR_INVALID);
  if (error != NULL) {
    CHECK(str_eq(error->field, "ips[1]"));
    CHECK(str_eq(error->object_kind, "Pod"));
    CHECK(str_eq(error->object_namespace, "a"));
    CHECK(str_eq(error->object_name, "b"));
  }
  CHECK(palisade_error_free(error) == PALISADE_OK);

  EXPECT_ERR(palisade_upsert_endpoint(e, S("{\"namespace\": \"a\", \"name\": \"b\", \"labels\": {\"app\": \"no spaces\"}}"), ERR),
             PALISADE_ERR_INVALID, "label");
  EXPECT_ERR(palisade_upsert_endpoint(e, S("{\"namespace\": \"a\", \"name\": \"b\", \"ports\": [{\"port\": 70000}]}"), ERR),
             PALISADE_ERR_INVALID, "ports[0].port");
  EXPECT_ERR(palisade_upsert_endpoint(e, S("{\"namespace\": \"a\", \"name\": \"b\", \"ports\": [{\"port\": 80, \"protocol\": \"ICMP\"}]}"), ERR),
             PALISADE_ERR_INVALID, "no ports");
  EXPECT_ERR(palisade_upsert_endpoint(e, S("{\"namespace\": \"a/b\", \"name\": \"b\"}"), ERR),
             PALISADE_ERR_INVALID, "namespace");

  EXPECT_ERR(palisade_delete_endpoint(e, NULL, 0, S("b"), ERR), PALISADE_ERR_NULL, "ns");
  EXPECT_ERR(palisade_delete_endpoint(e, S("a"), NULL, 0, ERR), PALISADE_ERR_NULL, "name");
  EXPECT_ERR(palisade_delete_endpoint(e, S("a"), S("b\xc0"), ERR), PALISADE_ERR_UTF8, "name");
  EXPECT_ERR(palisade_delete_endpoint(e, S("nowhere"), S("nobody"), ERR),
             PALISADE_ERR_NOT_FOUND, "nowhere/nobody");
}

static palisade_verdict *check_ok(palisade_engine *e, const palisade_connection *c) {
  palisade_verdict *v = NULL;
  palisade_error *error = NULL;
  palisade_status s = palisade_check(e, c, &v, &error);
  CHECK(s == PALISADE_OK && error == NULL && v != NULL);
  if (s != PALISADE_OK) {
    fprintf(stderr, "check %.*s -> %.*s: %s\n", (int)c->src_len, c->src, (int)c->dst_len,
            c->dst, error ? error->message.ptr : "?");
    palisade_error_free(error);
  }
  return v;
}

static void test_check(palisade_engine *e) {
  palisade_connection c = connection("shop-frontend/web", "shop-backend/api", 6, 8080);
  palisade_verdict *v;
  palisade_verdict copy;

  /* web -> api: allowed at both ends, by the shop policies. */
  v = check_ok(e, &c);
  if (v != NULL) {
    CHECK(v->allowed);
    CHECK(str_contains(v->flow, "TCP 10.10.1.10:"));
    CHECK(str_contains(v->flow, "-> 10.10.2.10:8080"));
    CHECK(v->egress.present && v->egress.allowed && !v->egress.logged);
    CHECK(str_eq(v->egress.endpoint, "shop-frontend/web"));
    CHECK(str_eq(v->egress.kind, "rule"));
    CHECK(str_eq(v->egress.tier, "default"));
    CHECK(str_eq(v->egress.policy, "np:shop-frontend/web-to-api"));
    CHECK(v->egress.rule == 0);
    CHECK(str_eq(v->egress.action, "allow"));
    CHECK(str_eq(v->egress.text, "allow by tier default, np:shop-frontend/web-to-api, rule 0 (allow)"));
    CHECK(v->ingress.present && v->ingress.allowed);
    CHECK(str_eq(v->ingress.endpoint, "shop-backend/api"));
    CHECK(str_eq(v->ingress.policy, "np:shop-backend/api-from-web"));
    CHECK(v->ingress.rule == 0);
    copy = *v;
    CHECK(palisade_verdict_free(v) == PALISADE_OK);
    /* Double free and made-up pointers are detected. */
    CHECK(palisade_verdict_free(v) == PALISADE_ERR_BAD_HANDLE);
    CHECK(palisade_verdict_free(&copy) == PALISADE_ERR_BAD_HANDLE);
  }
  CHECK(palisade_verdict_free(NULL) == PALISADE_OK);

  /* analytics -> api: denied at the end of the default tier (default-deny
   * has no rules, so no policy of the tier decides). Addresses work too. */
  c = connection("10.10.3.10", "10.10.2.10", 6, 8080);
  v = check_ok(e, &c);
  if (v != NULL) {
    CHECK(!v->allowed);
    CHECK(str_eq(v->egress.endpoint, "analytics/reporting"));
    CHECK(!v->egress.allowed && str_eq(v->egress.kind, "endOfTier"));
    CHECK(str_eq(v->egress.tier, "default") && v->egress.rule == -1);
    CHECK(str_eq(v->egress.action, "deny") && v->egress.policy.len == 0);
    CHECK(!v->ingress.allowed && str_eq(v->ingress.kind, "endOfTier"));
    CHECK(palisade_verdict_free(v) == PALISADE_OK);
  }

  /* From outside the cluster: no egress end; UDP DNS; ICMP echo. */
  c = connection("ip:192.0.2.7", "shop-backend/api", 6, 8080);
  c.src_port = 40000;
  v = check_ok(e, &c);
  if (v != NULL) {
    CHECK(!v->egress.present && v->egress.rule == -1 && v->egress.kind.len == 0);
    CHECK(v->ingress.present && !v->ingress.allowed && !v->allowed);
    CHECK(str_contains(v->flow, "192.0.2.7:40000"));
    CHECK(palisade_verdict_free(v) == PALISADE_OK);
  }
  c = connection("shop-frontend/web", "kube-system/coredns", 17, 53);
  v = check_ok(e, &c);
  if (v != NULL) {
    CHECK(v->allowed && str_eq(v->egress.policy, "gnp:allow-dns"));
    CHECK(palisade_verdict_free(v) == PALISADE_OK);
  }
  c = connection("shop-frontend/web", "shop-backend/api", 1, 0);
  c.icmp_type = 8;
  v = check_ok(e, &c);
  if (v != NULL) {
    CHECK(!v->allowed && str_contains(v->flow, "type 8 code 0"));
    CHECK(palisade_verdict_free(v) == PALISADE_OK);
  }

  /* Error paths. */
  c = connection("shop-frontend/web", "shop-backend/api", 6, 8080);
  {
    palisade_verdict *out = NULL;
    palisade_connection bad = c;
    EXPECT_ERR(palisade_check(e, NULL, &out, ERR), PALISADE_ERR_NULL, "conn");
    EXPECT_ERR(palisade_check(e, &c, NULL, ERR), PALISADE_ERR_NULL, "out");
    bad.struct_size = sizeof bad - 8;
    EXPECT_ERR(palisade_check(e, &bad, &out, ERR), PALISADE_ERR_SIZE, "struct_size");
    bad.struct_size = 0;
    EXPECT_ERR(palisade_check(e, &bad, &out, ERR), PALISADE_ERR_SIZE, "struct_size");
    bad = c;
    bad.src = NULL;
    EXPECT_ERR(palisade_check(e, &bad, &out, ERR), PALISADE_ERR_NULL, "src");
    bad = c;
    bad.dst = NULL;
    EXPECT_ERR(palisade_check(e, &bad, &out, ERR), PALISADE_ERR_NULL, "dst");
    bad = c;
    bad.src = "shop\xff/web";
    bad.src_len = 9;
    EXPECT_ERR(palisade_check(e, &bad, &out, ERR), PALISADE_ERR_UTF8, "src");
    bad = c;
    bad.dst_len = SIZE_MAX;
    EXPECT_ERR(palisade_check(e, &bad, &out, ERR), PALISADE_ERR_SIZE, "dst");
    bad = connection("shop-frontend/nobody", "shop-backend/api", 6, 8080);
    EXPECT_ERR(palisade_check(e, &bad, &out, ERR), PALISADE_ERR_NOT_FOUND, "nobody");
    bad = connection("nonsense", "shop-backend/api", 6, 8080);
    EXPECT_ERR(palisade_check(e, &bad, &out, ERR), PALISADE_ERR_INVALID, "src");
    bad = c;
    bad.protocol = 0;
    EXPECT_ERR(palisade_check(e, &bad, &out, ERR), PALISADE_ERR_INVALID, "protocol");
    bad.protocol = 300;
    EXPECT_ERR(palisade_check(e, &bad, &out, ERR), PALISADE_ERR_INVALID, "protocol");
    bad = c;
    bad.dst_port = 0;
    EXPECT_ERR(palisade_check(e, &bad, &out, ERR), PALISADE_ERR_INVALID, "port");
    bad = connection("shop-frontend/web", "shop-backend/api", 1, 80);
    EXPECT_ERR(palisade_check(e, &bad, &out, ERR), PALISADE_ERR_INVALID, "no ports");
    bad = c;
    bad.icmp_type = 3;
    EXPECT_ERR(palisade_check(e, &bad, &out, ERR), PALISADE_ERR_INVALID, "ICMP");
    bad = connection("shop-frontend/web", "shop-backend/api", 1, 0);
    bad.icmp_type = 256;
    EXPECT_ERR(palisade_check(e, &bad, &out, ERR), PALISADE_ERR_INVALID, "icmp_type");
    bad.icmp_type = -1;
    bad.icmp_code = 1;
    EXPECT_ERR(palisade_check(e, &bad, &out, ERR), PALISADE_ERR_INVALID, "icmp_code");
    bad = connection("ip:2001:db8::1", "shop-backend/api", 6, 8080);
    EXPECT_ERR(palisade_check(e, &bad, &out, ERR), PALISADE_ERR_INVALID, NULL);
    CHECK(out == NULL);
  }
}

static void test_endpoints(palisade_engine *e) {
  palisade_string delta = {NULL, 0};
  palisade_connection c;
  palisade_verdict *v;
  static const char pod[] =
      "{\"namespace\": \"shop-frontend\", \"name\": \"web2\", \"labels\": {\"app\": \"web\"},"
      " \"ips\": [\"10.10.1.11\", \"fd00::11\"], \"serviceAccount\": \"web\","
      " \"ports\": [{\"name\": \"http\", \"port\": 8080, \"protocol\": \"TCP\"}]}";

  CHECK(palisade_upsert_endpoint(e, S(pod), NULL) == PALISADE_OK);
  /* Staged, not applied: checks still see the old state. */
  c = connection("shop-frontend/web2", "shop-backend/api", 6, 8080);
  EXPECT_ERR(palisade_check(e, &c, &v, ERR), PALISADE_ERR_NOT_FOUND, "web2");
  CHECK(palisade_apply(e, &delta, NULL) == PALISADE_OK);
  CHECK(delta.ptr != NULL && delta.ptr[delta.len] == '\0');
  CHECK(contains(delta.ptr, delta.len, "\"changed\":true"));
  CHECK(contains(delta.ptr, delta.len, "\"endpoint\":\"shop-frontend/web2\""));
  CHECK(contains(delta.ptr, delta.len, "\"mapWrites\""));
  CHECK(palisade_string_free(&delta) == PALISADE_OK);
  v = check_ok(e, &c);
  if (v != NULL) {
    CHECK(v->allowed && str_eq(v->egress.policy, "np:shop-frontend/web-to-api"));
    CHECK(palisade_verdict_free(v) == PALISADE_OK);
  }
  /* Its IPv6 address reaches nothing IPv6 on the other side. */
  c = connection("fd00::11", "shop-backend/api", 6, 8080);
  EXPECT_ERR(palisade_check(e, &c, &v, ERR), PALISADE_ERR_INVALID, NULL);

  CHECK(palisade_delete_endpoint(e, S("shop-frontend"), S("web2"), NULL) == PALISADE_OK);
  /* Deleting twice: the first deletion is already staged. */
  EXPECT_ERR(palisade_delete_endpoint(e, S("shop-frontend"), S("web2"), ERR),
             PALISADE_ERR_NOT_FOUND, "web2");
  CHECK(palisade_apply(e, NULL, NULL) == PALISADE_OK);
  c = connection("shop-frontend/web2", "shop-backend/api", 6, 8080);
  EXPECT_ERR(palisade_check(e, &c, &v, ERR), PALISADE_ERR_NOT_FOUND, "web2");
}

static void test_strings_and_export(palisade_engine *e) {
  palisade_string maps = {NULL, 0};
  palisade_string copy;
  palisade_error *error = NULL;

  EXPECT_ERR(palisade_export_maps(e, NULL, ERR), PALISADE_ERR_NULL, "json_out");
  CHECK(palisade_export_maps(e, &maps, &error) == PALISADE_OK && error == NULL);
  CHECK(maps.ptr != NULL && maps.len > 0 && maps.ptr[maps.len] == '\0');
  CHECK(contains(maps.ptr, maps.len, "\"nodes\":[{"));
  CHECK(contains(maps.ptr, maps.len, "\"prefix\":\"10.10.2.10/32\""));
  CHECK(contains(maps.ptr, maps.len, "\"endpoint\":\"shop-backend/api\""));
  CHECK(contains(maps.ptr, maps.len, "\"policy\":\"np:shop-frontend/web-to-api\""));
  CHECK(contains(maps.ptr, maps.len, "\"memberStride\":1"));

  /* A changed length is refused and frees nothing; then the real free. */
  copy = maps;
  maps.len += 1;
  CHECK(palisade_string_free(&maps) == PALISADE_ERR_SIZE);
  CHECK(maps.ptr != NULL);
  maps.len -= 1;
  CHECK(palisade_string_free(&maps) == PALISADE_OK);
  CHECK(maps.ptr == NULL && maps.len == 0);
  /* Freeing through the same (reset) struct again is a no-op; through a
   * copy it is a detected double free. */
  CHECK(palisade_string_free(&maps) == PALISADE_OK);
  CHECK(palisade_string_free(&copy) == PALISADE_ERR_BAD_HANDLE);
  copy.ptr = (char *)(uintptr_t)0x4560;
  CHECK(palisade_string_free(&copy) == PALISADE_ERR_BAD_HANDLE);
  CHECK(palisade_string_free(NULL) == PALISADE_ERR_NULL);

  /* Errors: NULL is a no-op, double frees are detected. */
  CHECK(palisade_error_free(NULL) == PALISADE_OK);
  CHECK(palisade_upsert_endpoint(e, S("{"), &error) == PALISADE_ERR_PARSE);
  CHECK(palisade_error_free(error) == PALISADE_OK);
  CHECK(palisade_error_free(error) == PALISADE_ERR_BAD_HANDLE);
}

static void test_node_scoped(const char *examples) {
  palisade_engine *e = NULL;
  palisade_connection c = connection("shop-frontend/web", "shop-backend/api", 6, 8080);
  palisade_verdict *v;
  CHECK(palisade_engine_new(S("node-a"), &e, NULL) == PALISADE_OK);
  if (!load_examples(e, examples)) {
    failed++;
    palisade_engine_free(e);
    return;
  }
  CHECK(palisade_upsert_endpoint(
            e, S("{\"namespace\": \"shop-frontend\", \"name\": \"web\", \"labels\": {\"app\": \"web\"},"
                 " \"ips\": [\"10.10.1.10\"], \"node\": \"node-a\"}"),
            NULL) == PALISADE_OK);
  CHECK(palisade_apply(e, NULL, NULL) == PALISADE_OK);
  /* web is local (compiled programs); api is elsewhere (reference). */
  v = check_ok(e, &c);
  if (v != NULL) {
    CHECK(v->allowed && str_eq(v->egress.policy, "np:shop-frontend/web-to-api"));
    CHECK(str_eq(v->ingress.policy, "np:shop-backend/api-from-web"));
    CHECK(palisade_verdict_free(v) == PALISADE_OK);
  }
  /* Only local endpoints can be attached. */
  EXPECT_ERR(palisade_attach(e, S("lo"), S("shop-backend/api"), ERR), PALISADE_ERR_INVALID,
             "not on node node-a");
  CHECK(palisade_engine_free(e) == PALISADE_OK);
}

static void test_datapath(palisade_engine *e) {
  const char *iface = getenv("PALISADE_TEST_IFACE");
  palisade_error *error = NULL;
  palisade_status s;

  EXPECT_ERR(palisade_attach(e, NULL, 0, NULL, 0, ERR), PALISADE_ERR_NULL, "ifname");
  EXPECT_ERR(palisade_attach(e, S("lo"), NULL, 4, ERR), PALISADE_ERR_NULL, "endpoint");
  EXPECT_ERR(palisade_attach(e, S("l\xffo"), NULL, 0, ERR), PALISADE_ERR_UTF8, "ifname");
  EXPECT_ERR(palisade_attach(e, S("a/b"), NULL, 0, ERR), PALISADE_ERR_INVALID, "interface name");
  EXPECT_ERR(palisade_attach(e, S("an-interface-name-too-long"), NULL, 0, ERR),
             PALISADE_ERR_INVALID, "interface name");
  EXPECT_ERR(palisade_attach(e, S("lo"), S("no-slash"), ERR), PALISADE_ERR_INVALID, "endpoint");
  EXPECT_ERR(palisade_attach(e, S("lo"), S("shop-backend/nobody"), ERR), PALISADE_ERR_NOT_FOUND,
             "nobody");
  EXPECT_ERR(palisade_attach(e, S("nosuchif0"), NULL, 0, ERR), PALISADE_ERR_NOT_FOUND,
             "nosuchif0");
  EXPECT_ERR(palisade_detach(e, NULL, 0, ERR), PALISADE_ERR_NULL, "ifname");
  EXPECT_ERR(palisade_detach(e, S("lo\xff"), ERR), PALISADE_ERR_UTF8, "ifname");
  EXPECT_ERR(palisade_detach(e, S(""), ERR), PALISADE_ERR_INVALID, "interface name");
  EXPECT_ERR(palisade_detach(e, S("lo"), ERR), PALISADE_ERR_NOT_FOUND, "not attached");
  {
    uint64_t removed = 0;
    EXPECT_ERR(palisade_expire_conntrack(e, NULL, ERR), PALISADE_ERR_NULL, "removed");
    /* Nothing attached yet: no datapath (or none in this build). */
    s = palisade_expire_conntrack(e, &removed, &error);
    CHECK(s == PALISADE_ERR_NOT_FOUND || s == PALISADE_ERR_DATAPATH);
    CHECK(error != NULL && error->code == s);
    CHECK(palisade_error_free(error) == PALISADE_OK);
    error = NULL;
  }

  {
    static const uint8_t mac[6] = {0x02, 0x50, 0, 0, 0, 1};
    EXPECT_ERR(palisade_set_local_endpoint(e, NULL, 0, NULL, 0, NULL, ERR), PALISADE_ERR_NULL,
               "addr");
    EXPECT_ERR(palisade_set_local_endpoint(e, S("10.10.1.300"), S("lo"), mac, ERR),
               PALISADE_ERR_INVALID, "addr");
    EXPECT_ERR(palisade_set_local_endpoint(e, S("10.10.1.10"), S("lo"), NULL, ERR),
               PALISADE_ERR_NULL, "pod_mac");
    EXPECT_ERR(palisade_set_local_endpoint(e, S("10.10.1.10"), S("a/b"), mac, ERR),
               PALISADE_ERR_INVALID, "interface name");
    /* Nothing attached yet: no datapath (or none in this build). */
    s = palisade_set_local_endpoint(e, S("10.10.1.10"), S("lo"), mac, &error);
    CHECK(s == PALISADE_ERR_NOT_FOUND || s == PALISADE_ERR_DATAPATH);
    CHECK(error != NULL && error->code == s);
    CHECK(palisade_error_free(error) == PALISADE_OK);
    error = NULL;
  }

  /* Attach to lo without binding an endpoint (traffic keeps passing).
   * Without root or datapath support this is PALISADE_ERR_DATAPATH. */
  s = palisade_attach(e, S("lo"), NULL, 0, &error);
  CHECK(s == PALISADE_OK || s == PALISADE_ERR_DATAPATH);
  if (s != PALISADE_OK) {
    /* The message can carry the whole verifier log: print its start. */
    printf("datapath unavailable: %.300s\n", error ? error->message.ptr : "?");
    CHECK(error != NULL && error->code == PALISADE_ERR_DATAPATH);
    CHECK(palisade_error_free(error) == PALISADE_OK);
    return;
  }
  {
    /* Local delivery through an attached interface; entries go with it. */
    static const uint8_t mac[6] = {0x02, 0x50, 0, 0, 0, 1};
    CHECK(palisade_set_local_endpoint(e, S("10.10.1.10"), S("lo"), mac, NULL) == PALISADE_OK);
    CHECK(palisade_set_local_endpoint(e, S("fd00::10"), S("lo"), mac, NULL) == PALISADE_OK);
    EXPECT_ERR(palisade_set_local_endpoint(e, S("10.10.1.11"), S("nosuchif0"), mac, ERR),
               PALISADE_ERR_NOT_FOUND, "not attached");
    CHECK(palisade_set_local_endpoint(e, S("10.10.1.10"), NULL, 0, NULL, NULL) == PALISADE_OK);
    /* Removing an address without an entry is no error. */
    CHECK(palisade_set_local_endpoint(e, S("10.10.1.10"), NULL, 0, NULL, NULL) == PALISADE_OK);
  }
  CHECK(palisade_detach(e, S("lo"), NULL) == PALISADE_OK);
  EXPECT_ERR(palisade_detach(e, S("lo"), ERR), PALISADE_ERR_NOT_FOUND, "not attached");
  {
    static const uint8_t mac[6] = {0x02, 0x50, 0, 0, 0, 1};
    EXPECT_ERR(palisade_set_local_endpoint(e, S("10.10.1.10"), S("lo"), mac, ERR),
               PALISADE_ERR_NOT_FOUND, "not attached");
  }
  {
    /* The datapath stays loaded after a detach; no traffic, nothing idle. */
    uint64_t removed = 99;
    CHECK(palisade_expire_conntrack(e, &removed, NULL) == PALISADE_OK);
    CHECK(removed == 0);
  }

  if (iface != NULL) {
    palisade_string maps = {NULL, 0};
    palisade_string delta = {NULL, 0};
    s = palisade_attach(e, iface, strlen(iface), S("shop-frontend/web"), &error);
    CHECK(s == PALISADE_OK);
    if (s != PALISADE_OK) {
      fprintf(stderr, "attach %s: %s\n", iface, error ? error->message.ptr : "?");
      palisade_error_free(error);
      return;
    }
    /* Binding the same endpoint elsewhere is refused. */
    EXPECT_ERR(palisade_attach(e, S("lo"), S("shop-frontend/web"), ERR), PALISADE_ERR_INVALID,
               "detach that first");
    CHECK(palisade_export_maps(e, &maps, NULL) == PALISADE_OK);
    CHECK(contains(maps.ptr, maps.len, "\"endpoints\":[\"shop-frontend/web\"]"));
    CHECK(contains(maps.ptr, maps.len, "\"boundSlots\":[{"));
    CHECK(palisade_string_free(&maps) == PALISADE_OK);
    /* Applies while attached write to the kernel maps. */
    CHECK(palisade_upsert_endpoint(
              e, S("{\"namespace\": \"shop-frontend\", \"name\": \"web\", \"labels\": {\"app\": \"web\"},"
                   " \"ips\": [\"10.10.1.10\", \"10.10.1.12\"]}"),
              NULL) == PALISADE_OK);
    CHECK(palisade_apply(e, &delta, NULL) == PALISADE_OK);
    CHECK(contains(delta.ptr, delta.len, "\"address\":\"10.10.1.12\""));
    CHECK(palisade_string_free(&delta) == PALISADE_OK);
    CHECK(palisade_detach(e, iface, strlen(iface), NULL) == PALISADE_OK);
    /* Attached again and left attached: freeing the engine detaches it. */
    CHECK(palisade_attach(e, iface, strlen(iface), S("shop-frontend/web"), NULL) == PALISADE_OK);
    printf("datapath attached to lo and %s and detached\n", iface);
  } else {
    printf("datapath attached to lo and detached (no PALISADE_TEST_IFACE)\n");
  }
}

int main(int argc, char **argv) {
  palisade_engine *e = NULL;
  const char *examples = argc > 1 ? argv[1] : getenv("PALISADE_EXAMPLES");
  if (examples == NULL) {
    fprintf(stderr, "usage: %s EXAMPLES_DIR\n", argv[0]);
    return 2;
  }

  test_version_and_status();
  test_engine_lifecycle();

  CHECK(palisade_engine_new(NULL, 0, &e, NULL) == PALISADE_OK);
  if (!load_examples(e, examples)) {
    fprintf(stderr, "cannot load the zero-trust example\n");
    palisade_engine_free(e);
    return 1;
  }
  {
    palisade_string delta = {NULL, 0};
    palisade_error *error = NULL;
    CHECK(palisade_apply(e, &delta, &error) == PALISADE_OK && error == NULL);
    CHECK(contains(delta.ptr, delta.len, "\"changed\":true"));
    CHECK(palisade_string_free(&delta) == PALISADE_OK);
  }
  test_manifest_errors(e);
  test_endpoint_errors(e);
  test_check(e);
  test_endpoints(e);
  test_strings_and_export(e);
  test_datapath(e);
  CHECK(palisade_engine_free(e) == PALISADE_OK);
  CHECK(palisade_engine_free(e) == PALISADE_ERR_BAD_HANDLE);

  test_node_scoped(examples);

  printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
