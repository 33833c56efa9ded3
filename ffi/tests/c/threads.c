/*
 * Thread safety: several threads check connections on one engine while
 * another stages and applies changes, then the engine is freed while they
 * may still be calling it. Every call returns PALISADE_OK, or
 * PALISADE_ERR_BAD_HANDLE once the engine is gone; nothing crashes or leaks.
 */
#include <pthread.h>
#include <stdio.h>
#include <string.h>

#include "palisade.h"

#define S(lit) (lit), (sizeof(lit) - 1)
#define THREADS 4
#define ROUNDS 25

static const char manifests[] =
    "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---\n"
    "apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: shop, labels: {app: web}}\n"
    "status: {podIP: 10.0.0.1}\n---\n"
    "apiVersion: v1\nkind: Pod\nmetadata: {name: db, namespace: shop, labels: {app: db}}\n"
    "status: {podIP: 10.0.0.2}\n---\n"
    "apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\n"
    "metadata: {name: db-from-web, namespace: shop}\n"
    "spec: {selector: app == 'db', ingress: [{action: Allow, source: {selector: app == 'web'}}]}\n";

static palisade_engine *engine;
static int unexpected;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

static void note(const char *what, palisade_status s) {
  pthread_mutex_lock(&lock);
  unexpected++;
  fprintf(stderr, "%s: unexpected status %d\n", what, (int)s);
  pthread_mutex_unlock(&lock);
}

static void *checker(void *arg) {
  palisade_connection c;
  int i;
  (void)arg;
  memset(&c, 0, sizeof c);
  c.struct_size = sizeof c;
  c.src = "shop/web";
  c.src_len = strlen(c.src);
  c.dst = "shop/db";
  c.dst_len = strlen(c.dst);
  c.protocol = 6;
  c.dst_port = 5432;
  c.icmp_type = -1;
  c.icmp_code = -1;
  for (i = 0; i < ROUNDS; i++) {
    palisade_verdict *v = NULL;
    palisade_error *err = NULL;
    palisade_status s = palisade_check(engine, &c, &v, &err);
    if (s == PALISADE_OK) {
      if (!v->allowed) note("verdict", s);
      palisade_verdict_free(v);
    } else if (s != PALISADE_ERR_BAD_HANDLE) {
      note("check", s);
    }
    palisade_error_free(err);
  }
  return NULL;
}

static void *updater(void *arg) {
  int i;
  (void)arg;
  for (i = 0; i < ROUNDS; i++) {
    char json[200];
    palisade_status s;
    int n = snprintf(json, sizeof json,
                     "{\"namespace\": \"shop\", \"name\": \"extra%d\", \"labels\": {\"app\": \"web\"},"
                     " \"ips\": [\"10.0.1.%d\"]}",
                     i, i + 1);
    s = palisade_upsert_endpoint(engine, json, (size_t)n, NULL);
    if (s != PALISADE_OK && s != PALISADE_ERR_BAD_HANDLE) note("upsert", s);
    s = palisade_apply(engine, NULL, NULL);
    if (s != PALISADE_OK && s != PALISADE_ERR_BAD_HANDLE) note("apply", s);
  }
  return NULL;
}

int main(void) {
  pthread_t threads[THREADS + 1];
  int i, checks = 0;
  if (palisade_engine_new(NULL, 0, &engine, NULL) != PALISADE_OK ||
      palisade_load_manifests(engine, NULL, 0, S(manifests), NULL) != PALISADE_OK ||
      palisade_apply(engine, NULL, NULL) != PALISADE_OK) {
    fprintf(stderr, "setup failed\n");
    return 1;
  }
  for (i = 0; i < THREADS; i++) pthread_create(&threads[i], NULL, checker, NULL);
  pthread_create(&threads[THREADS], NULL, updater, NULL);
  /* Free the engine while the others are still at work. */
  pthread_join(threads[0], NULL);
  checks++;
  if (palisade_engine_free(engine) != PALISADE_OK) unexpected++;
  for (i = 1; i <= THREADS; i++) pthread_join(threads[i], NULL);
  if (palisade_engine_free(engine) != PALISADE_ERR_BAD_HANDLE) unexpected++;
  checks++;
  printf("%d passed, %d failed\n", unexpected == 0 ? THREADS * ROUNDS + checks : 0, unexpected);
  return unexpected == 0 ? 0 : 1;
}
