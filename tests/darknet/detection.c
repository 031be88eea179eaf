/* Darknet's detection layer (YOLOv1's output layer) run on a given network output.
   The project's own harness for tests/test_darknet_detection.py; it calls Darknet's functions and
   copies none of them. All files are raw little-endian float32 in Darknet's layout (per image:
   every cell's C class probabilities, then every cell's N confidences, then every cell's N boxes
   x, y, sqrt_w, sqrt_h).

   detection decode SIDE NUM CLASSES THRESH NMS OUTPUT.bin
       One image. What `darknet yolo valid` (examples/yolo.c validate_yolo) does after
       network_predict: get_network_boxes (-> get_detection_detections) with w = h = 1 (image-relative
       boxes), do_nms_sort per class, then the corners clipped to the image as
       print_yolo_detections does. Prints one line per kept (box, class): "class prob x1 y1 x2 y2".

   detection loss SIDE NUM CLASSES BATCH OBJECT NOOBJECT CLASS COORD OUTPUT.bin TRUTH.bin OUT.bin
       forward_detection_layer with net.train = 1 on BATCH images and their truth (per cell:
       is_obj, CLASSES one-hot, x, y (cell), w, h (image), as fill_truth_region writes it).
       Writes l.delta (BATCH * inputs floats) then *l.cost to OUT.bin.

   detection truth SIDE CLASSES SEED IMAGE_PATH
       fill_truth_region (src/data.c; no flip, no crop or scale) for the label file that Darknet
       derives from IMAGE_PATH (images -> labels, .jpg -> .txt), after srand(SEED) (it shuffles the
       boxes with rand()). Prints the SIDE*SIDE*(5+CLASSES) truth values, one per line. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "darknet.h"
#include "detection_layer.h"

/* Not declared in any header; defined in src/data.c. */
void fill_truth_region(char *path, float *truth, int classes, int num_boxes, int flip,
                       float dx, float dy, float sx, float sy);

static float *read_floats(const char *path, size_t n)
{
    FILE *f = fopen(path, "rb");
    if (!f) { fprintf(stderr, "cannot open %s\n", path); exit(2); }
    float *data = calloc(n, sizeof(float));
    size_t got = fread(data, sizeof(float), n, f);
    if (got != n || fgetc(f) != EOF) {
        fprintf(stderr, "%s: expected exactly %zu floats\n", path, n);
        exit(2);
    }
    fclose(f);
    return data;
}

static detection_layer yolov1_layer(int batch, int side, int num, int classes)
{
    int inputs = side * side * ((1 + 4) * num + classes);
    detection_layer l = make_detection_layer(batch, inputs, num, side, classes, 4, 1);
    l.sqrt = 1;      /* cfg/yolov1.cfg: sqrt=1, softmax=0, rescore=1 */
    l.softmax = 0;
    return l;
}

static float clip01(float v) { return v < 0 ? 0 : (v > 1 ? 1 : v); }

static int decode(int argc, char **argv)
{
    if (argc != 8) { fprintf(stderr, "usage: detection decode SIDE NUM CLASSES THRESH NMS OUTPUT.bin\n"); return 2; }
    int side = atoi(argv[2]), num = atoi(argv[3]), classes = atoi(argv[4]);
    float thresh = atof(argv[5]), nms = atof(argv[6]);
    detection_layer l = yolov1_layer(1, side, num, classes);
    network *net = make_network(1);
    net->input = read_floats(argv[7], l.inputs);
    net->train = 0;
    forward_detection_layer(l, *net);  /* test time: copies the input to l.output */
    net->layers[0] = l;
    int nboxes = 0;
    detection *dets = get_network_boxes(net, 1, 1, thresh, 0, 0, 0, &nboxes);
    do_nms_sort(dets, side * side * num, classes, nms);
    for (int i = 0; i < nboxes; ++i) {
        box b = dets[i].bbox;
        float x1 = clip01(b.x - b.w / 2.), y1 = clip01(b.y - b.h / 2.);
        float x2 = clip01(b.x + b.w / 2.), y2 = clip01(b.y + b.h / 2.);
        for (int k = 0; k < classes; ++k)
            if (dets[i].prob[k] != 0)
                printf("%d %.9g %.9g %.9g %.9g %.9g\n", k, dets[i].prob[k], x1, y1, x2, y2);
    }
    free_detections(dets, nboxes);
    return 0;
}

static int loss(int argc, char **argv)
{
    if (argc != 13) {
        fprintf(stderr, "usage: detection loss SIDE NUM CLASSES BATCH OBJECT NOOBJECT CLASS COORD "
                        "OUTPUT.bin TRUTH.bin OUT.bin\n");
        return 2;
    }
    int side = atoi(argv[2]), num = atoi(argv[3]), classes = atoi(argv[4]), batch = atoi(argv[5]);
    detection_layer l = yolov1_layer(batch, side, num, classes);
    l.object_scale = atof(argv[6]);
    l.noobject_scale = atof(argv[7]);
    l.class_scale = atof(argv[8]);
    l.coord_scale = atof(argv[9]);
    network *net = make_network(1);
    net->input = read_floats(argv[10], (size_t)batch * l.inputs);
    net->truth = read_floats(argv[11], (size_t)batch * l.truths);
    net->train = 1;
    /* forward_detection_layer prints its averages to stdout: the results go to a file. */
    forward_detection_layer(l, *net);
    FILE *out = fopen(argv[12], "wb");
    if (!out) { fprintf(stderr, "cannot write %s\n", argv[12]); return 2; }
    fwrite(l.delta, sizeof(float), (size_t)batch * l.inputs, out);
    fwrite(l.cost, sizeof(float), 1, out);
    fclose(out);
    return 0;
}

static int truth(int argc, char **argv)
{
    if (argc != 6) { fprintf(stderr, "usage: detection truth SIDE CLASSES SEED IMAGE_PATH\n"); return 2; }
    int side = atoi(argv[2]), classes = atoi(argv[3]);
    int n = side * side * (5 + classes);
    float *t = calloc(n, sizeof(float));
    srand(atoi(argv[4]));
    fill_truth_region(argv[5], t, classes, side, 0, 0, 0, 1, 1);
    for (int i = 0; i < n; ++i) printf("%.9g\n", t[i]);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc > 1 && !strcmp(argv[1], "decode")) return decode(argc, argv);
    if (argc > 1 && !strcmp(argv[1], "loss")) return loss(argc, argv);
    if (argc > 1 && !strcmp(argv[1], "truth")) return truth(argc, argv);
    fprintf(stderr, "usage: detection decode|loss|truth ...\n");
    return 2;
}
