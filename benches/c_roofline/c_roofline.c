/*
 * The C reference the benchmarks hold l1l2_rs against: the same fused one-pass math (|x| and x^2
 * of float32/float64 summed in float64 accumulators, penalty = l1 * sum|x| + l2 * sum x^2) in
 * plain C, on one thread or on an OpenMP team, plus a copy (the floor of any op that writes an
 * output array). A CPython C-API module (METH_FASTCALL, no ctypes), so that its per-call cost is
 * the least an extension can have and small sizes compare fairly.
 *
 * benches/compare.py compiles it at startup with the system gcc; by hand:
 *
 *   gcc -O3 -march=native -fopenmp -fPIC -shared \
 *       -I"$(python -c 'import sysconfig; print(sysconfig.get_paths()["include"])')" \
 *       benches/c_roofline/c_roofline.c \
 *       -o "_c_roofline$(python -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')"
 *
 * Functions (all release the GIL while they compute, as l1l2_rs does):
 *   penalty(x, l1, l2, threads) -> float   x: C-contiguous float32 or float64 buffer
 *   sums(x, threads) -> (sum|x|, sum x^2)
 *   copy(dst, src, threads) -> None         same-sized C-contiguous writable dst
 * threads == 1 runs on the calling thread without entering OpenMP; threads > 1 opens a parallel
 * region of that many threads, each summing one static, contiguous share.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <omp.h>
#include <string.h>

/* Independent accumulators per quantity: enough to hide the add latency with 512-bit vectors
 * (2 adds per cycle x 4 cycles x 8 doubles), so a cached input runs at load throughput. */
#define LANES 64

typedef struct {
    double abs;
    double sq;
} Sums;

#define DEFINE_SUMS(NAME, T)                                                                       \
    static Sums NAME(const T *x, Py_ssize_t n) {                                                   \
        double a[LANES] = {0}, q[LANES] = {0};                                                     \
        Py_ssize_t body = n - n % LANES;                                                           \
        for (Py_ssize_t i = 0; i < body; i += LANES) {                                             \
            _Pragma("omp simd") for (int j = 0; j < LANES; j++) {                                  \
                double v = (double)x[i + j];                                                       \
                a[j] += fabs(v);                                                                   \
                q[j] += v * v;                                                                     \
            }                                                                                      \
        }                                                                                          \
        Sums s = {0.0, 0.0};                                                                       \
        for (Py_ssize_t i = body; i < n; i++) {                                                    \
            double v = (double)x[i];                                                               \
            s.abs += fabs(v);                                                                      \
            s.sq += v * v;                                                                         \
        }                                                                                          \
        for (int j = 0; j < LANES; j++) {                                                          \
            s.abs += a[j];                                                                         \
            s.sq += q[j];                                                                          \
        }                                                                                          \
        return s;                                                                                  \
    }

DEFINE_SUMS(sums_f32, float)
DEFINE_SUMS(sums_f64, double)

/* One thread's static share of n items: contiguous, boundaries on multiples of 64 elements. */
static void share(Py_ssize_t n, int thread, int threads, Py_ssize_t *start, Py_ssize_t *end) {
    Py_ssize_t blocks = (n + 63) / 64;
    Py_ssize_t lo = blocks * thread / threads * 64, hi = blocks * (thread + 1) / threads * 64;
    *start = lo < n ? lo : n;
    *end = hi < n ? hi : n;
}

static Sums sums_any(const void *x, Py_ssize_t n, int is_double, int threads) {
    if (threads <= 1)
        return is_double ? sums_f64((const double *)x, n) : sums_f32((const float *)x, n);
    double total_abs = 0.0, total_sq = 0.0;
#pragma omp parallel num_threads(threads) reduction(+ : total_abs, total_sq)
    {
        Py_ssize_t start, end;
        share(n, omp_get_thread_num(), omp_get_num_threads(), &start, &end);
        Sums s = is_double ? sums_f64((const double *)x + start, end - start)
                           : sums_f32((const float *)x + start, end - start);
        total_abs += s.abs;
        total_sq += s.sq;
    }
    Sums s = {total_abs, total_sq};
    return s;
}

static void copy_any(char *dst, const char *src, Py_ssize_t bytes, int threads) {
    if (threads <= 1) {
        memcpy(dst, src, (size_t)bytes);
        return;
    }
#pragma omp parallel num_threads(threads)
    {
        Py_ssize_t start, end;
        share(bytes, omp_get_thread_num(), omp_get_num_threads(), &start, &end);
        memcpy(dst + start, src + start, (size_t)(end - start));
    }
}

/* A C-contiguous float32/float64 view of `object`; 0 and an exception if it is not one. */
static int float_buffer(PyObject *object, Py_buffer *view, int *is_double, int writable) {
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(object, view, flags) != 0)
        return 0;
    const char *format = view->format ? view->format : "B";
    if (format[0] == '<' || format[0] == '=' || format[0] == '@')
        format++;
    if (strcmp(format, "f") == 0 && view->itemsize == 4) {
        *is_double = 0;
        return 1;
    }
    if (strcmp(format, "d") == 0 && view->itemsize == 8) {
        *is_double = 1;
        return 1;
    }
    PyBuffer_Release(view);
    PyErr_Format(PyExc_TypeError, "x: expected a float32 or float64 buffer, got format '%s'",
                 format);
    return 0;
}

static int thread_count(PyObject *object) {
    long threads = PyLong_AsLong(object);
    if (threads == -1 && PyErr_Occurred())
        return 0;
    if (threads < 1 || threads > 256) {
        PyErr_SetString(PyExc_ValueError, "threads: expected 1..256");
        return 0;
    }
    return (int)threads;
}

static int summed(PyObject *x_object, PyObject *threads_object, Sums *out) {
    int threads = thread_count(threads_object);
    if (threads == 0)
        return 0;
    Py_buffer view;
    int is_double;
    if (!float_buffer(x_object, &view, &is_double, 0))
        return 0;
    Py_ssize_t n = view.len / view.itemsize;
    Py_BEGIN_ALLOW_THREADS
    *out = sums_any(view.buf, n, is_double, threads);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    return 1;
}

static PyObject *penalty(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "penalty(x, l1, l2, threads)");
        return NULL;
    }
    double l1 = PyFloat_AsDouble(args[1]), l2 = PyFloat_AsDouble(args[2]);
    if (PyErr_Occurred())
        return NULL;
    Sums s;
    if (!summed(args[0], args[3], &s))
        return NULL;
    return PyFloat_FromDouble(l1 * s.abs + l2 * s.sq);
}

static PyObject *sums(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "sums(x, threads)");
        return NULL;
    }
    Sums s;
    if (!summed(args[0], args[1], &s))
        return NULL;
    return Py_BuildValue("(dd)", s.abs, s.sq);
}

static PyObject *copy(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "copy(dst, src, threads)");
        return NULL;
    }
    int threads = thread_count(args[2]);
    if (threads == 0)
        return NULL;
    Py_buffer dst, src;
    if (PyObject_GetBuffer(args[0], &dst, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) != 0)
        return NULL;
    if (PyObject_GetBuffer(args[1], &src, PyBUF_C_CONTIGUOUS) != 0) {
        PyBuffer_Release(&dst);
        return NULL;
    }
    if (dst.len != src.len) {
        PyBuffer_Release(&dst);
        PyBuffer_Release(&src);
        PyErr_SetString(PyExc_ValueError, "dst: expected as many bytes as src");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    copy_any((char *)dst.buf, (const char *)src.buf, src.len, threads);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&dst);
    PyBuffer_Release(&src);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"penalty", (PyCFunction)(void (*)(void))penalty, METH_FASTCALL,
     "l1 * sum|x| + l2 * sum x^2 on `threads` threads"},
    {"sums", (PyCFunction)(void (*)(void))sums, METH_FASTCALL, "(sum|x|, sum x^2)"},
    {"copy", (PyCFunction)(void (*)(void))copy, METH_FASTCALL, "dst[:] = src on `threads` threads"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_c_roofline", "C reference for the l1l2 benchmarks", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__c_roofline(void) { return PyModule_Create(&module); }
