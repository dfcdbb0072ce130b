/* tdask: the C side of Triton in the worker's own process (tdask/triton/inprocess.py).
 *
 * Triton calls these from its own threads. None of them touches Python, so a Triton thread never
 * waits for the GIL: the response allocator hands out pooled host buffers, and the completion
 * callbacks only append an event to a queue and, when the queue was idle, write once to an
 * eventfd that the worker's event loop watches. The loop then drains every event queued so far
 * in one call (one wake-up per batch of completions, not one GIL hand-off per callback).
 *
 * Built on first use with the system C compiler when there is one (no compiler is needed to
 * install tdask); without it, inprocess.py falls back to the same logic in Python callbacks.
 * Needs no Triton header: the Triton types are opaque pointers here.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef struct {
  int64_t kind; /* 0: a response (ptr may be NULL: a final flag alone), 1: a request released */
  int64_t flags;
  void* ptr;
  void* userp;
} tdask_event;

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static tdask_event* ring = NULL;
static size_t cap = 0, head = 0, count = 0;
static int wake_fd = -1;
static int signalled = 0;
typedef void* (*error_new_fn)(int code, const char* msg);
static error_new_fn error_new = NULL;

/* Host buffer pool: power-of-two classes from 2^12 to 2^30; small sizes come from malloc. */
#define POOL_MIN_SHIFT 12
#define POOL_CLASSES 19
#define POOL_KEEP 16
static void* pool[POOL_CLASSES][POOL_KEEP];
static int pool_n[POOL_CLASSES];
static uint64_t pool_hits = 0, pool_misses = 0;

int tdask_init(int fd, void* errnew, size_t capacity) {
  pthread_mutex_lock(&mu);
  wake_fd = fd;
  error_new = (error_new_fn)errnew;
  if (ring == NULL) {
    cap = capacity < 64 ? 64 : capacity;
    ring = (tdask_event*)calloc(cap, sizeof(tdask_event));
  }
  head = count = 0;
  signalled = 0;
  pthread_mutex_unlock(&mu);
  return ring == NULL ? -1 : 0;
}

static void push(int64_t kind, uint32_t flags, void* ptr, void* userp) {
  int wake = 0;
  pthread_mutex_lock(&mu);
  if (count == cap) { /* grow, keeping order */
    size_t ncap = cap * 2;
    tdask_event* n = (tdask_event*)malloc(ncap * sizeof(tdask_event));
    if (n != NULL) {
      for (size_t i = 0; i < count; i++) n[i] = ring[(head + i) % cap];
      free(ring);
      ring = n;
      cap = ncap;
      head = 0;
    }
  }
  if (count < cap) {
    tdask_event* e = &ring[(head + count) % cap];
    e->kind = kind;
    e->flags = flags;
    e->ptr = ptr;
    e->userp = userp;
    count++;
  }
  if (!signalled) {
    signalled = 1;
    wake = 1;
  }
  int fd = wake_fd;
  pthread_mutex_unlock(&mu);
  if (wake && fd >= 0) {
    uint64_t one = 1;
    ssize_t r = write(fd, &one, sizeof(one));
    (void)r;
  }
}

/* Move up to max events into out; once the queue is empty the next push wakes the loop again. */
size_t tdask_drain(tdask_event* out, size_t max) {
  pthread_mutex_lock(&mu);
  size_t n = count < max ? count : max;
  for (size_t i = 0; i < n; i++) out[i] = ring[(head + i) % cap];
  head = (head + n) % (cap ? cap : 1);
  count -= n;
  if (count == 0) signalled = 0;
  pthread_mutex_unlock(&mu);
  return n;
}

void tdask_response_complete(void* response, uint32_t flags, void* userp) { push(0, flags, response, userp); }

void tdask_request_release(void* request, uint32_t flags, void* userp) { push(1, flags, request, userp); }

static int pool_class(size_t size) {
  int c = 0;
  size_t s = (size_t)1 << POOL_MIN_SHIFT;
  while (s < size && c < POOL_CLASSES) {
    s <<= 1;
    c++;
  }
  return c < POOL_CLASSES ? c : -1;
}

/* Every buffer handed to Triton follows a header of HDR bytes (keeping malloc's alignment):
 * its pool class (-1: not pooled) and whether Python adopted it. An adopted buffer is a numpy
 * array's memory now (a response output handed out without a copy): Triton's release leaves it
 * alone, and tdask_free_adopted returns it to the pool when the array is collected. */
#define HDR 64
#define TDASK_BUFFER_TAG ((void*)0x7464736bUL) /* buffer_userp of tdask's buffers: "tdsk" */
typedef struct {
  int32_t cls;
  int32_t adopted;
} tdask_hdr;

static void* base_alloc(size_t total) {
  void* p = NULL;
  int c = -1;
  if (total >= ((size_t)1 << POOL_MIN_SHIFT)) c = pool_class(total);
  if (c >= 0) {
    pthread_mutex_lock(&mu);
    if (pool_n[c] > 0) {
      p = pool[c][--pool_n[c]];
      pool_hits++;
    } else {
      pool_misses++;
    }
    pthread_mutex_unlock(&mu);
    if (p == NULL) p = malloc((size_t)1 << (POOL_MIN_SHIFT + c));
  } else {
    p = malloc(total);
  }
  if (p != NULL) {
    tdask_hdr* h = (tdask_hdr*)p;
    h->cls = c;
    __atomic_store_n(&h->adopted, 0, __ATOMIC_RELEASE);
  }
  return p;
}

static void base_free(void* p) {
  int c = ((tdask_hdr*)p)->cls;
  if (c >= 0) {
    pthread_mutex_lock(&mu);
    if (pool_n[c] < POOL_KEEP) {
      pool[c][pool_n[c]++] = p;
      p = NULL;
    }
    pthread_mutex_unlock(&mu);
  }
  free(p);
}

/* TRITONSERVER_ResponseAllocatorAllocFn_t. The hook for device outputs: memory_type and
 * memory_type_id are Triton's preference per output; this build always answers host memory
 * (TRITONSERVER_MEMORY_CPU, id 0), and Triton copies device outputs into it. */
void* tdask_alloc(void* allocator, const char* name, size_t byte_size, int memory_type, int64_t memory_type_id,
                  void* userp, void** buffer, void** buffer_userp, int* actual_memory_type,
                  int64_t* actual_memory_type_id) {
  (void)allocator; (void)name; (void)memory_type; (void)memory_type_id; (void)userp;
  *buffer_userp = NULL;
  *actual_memory_type = 0;
  *actual_memory_type_id = 0;
  if (byte_size == 0) {
    *buffer = NULL;
    return NULL;
  }
  void* p = base_alloc(byte_size + HDR);
  if (p == NULL) return error_new != NULL ? error_new(1 /* INTERNAL */, "tdask: out of host memory") : NULL;
  *buffer = (char*)p + HDR;
  *buffer_userp = TDASK_BUFFER_TAG;
  return NULL;
}

/* TRITONSERVER_ResponseAllocatorReleaseFn_t: back to the pool (or free), unless adopted. */
void* tdask_release(void* allocator, void* buffer, void* buffer_userp, size_t byte_size, int memory_type,
                    int64_t memory_type_id) {
  (void)allocator; (void)byte_size; (void)memory_type; (void)memory_type_id;
  if (buffer == NULL || buffer_userp != TDASK_BUFFER_TAG) return NULL;
  tdask_hdr* h = (tdask_hdr*)((char*)buffer - HDR);
  if (__atomic_load_n(&h->adopted, __ATOMIC_ACQUIRE)) return NULL; /* a numpy array's now */
  base_free(h);
  return NULL;
}

/* Python takes a buffer of a response it is reading (before deleting the response). */
void tdask_adopt(void* buffer) {
  tdask_hdr* h = (tdask_hdr*)((char*)buffer - HDR);
  __atomic_store_n(&h->adopted, 1, __ATOMIC_RELEASE);
}

/* The array that owned an adopted buffer was collected. */
void tdask_free_adopted(void* buffer) { base_free((char*)buffer - HDR); }

uintptr_t tdask_buffer_tag(void) { return (uintptr_t)TDASK_BUFFER_TAG; }

void tdask_pool_stats(uint64_t* hits, uint64_t* misses) {
  pthread_mutex_lock(&mu);
  *hits = pool_hits;
  *misses = pool_misses;
  pthread_mutex_unlock(&mu);
}
