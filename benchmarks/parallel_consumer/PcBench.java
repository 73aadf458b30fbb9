// Confluent's Parallel Consumer on the parallel_consumer workload of benchmarks/parallel.py.
//
//   java -cp '.kafka/pc-libs/*' benchmarks/parallel_consumer/PcBench.java \
//        BOOTSTRAP TOPIC GROUP DELAYS_FILE MAX_CONCURRENCY
//
// DELAYS_FILE holds one work time in seconds per line, line N for offset N (the same waits the other
// consumers of the benchmark do). Records are processed in KEY order; the wait of a record is a sleep.
// Prints one JSON line: records, wall_s (first record started to last finished), join_s (start to
// the first record), order_violations (a key's record started before an earlier one of that key).

import io.confluent.parallelconsumer.ParallelConsumerOptions;
import io.confluent.parallelconsumer.internal.DrainingCloseable;
import io.confluent.parallelconsumer.ParallelConsumerOptions.CommitMode;
import io.confluent.parallelconsumer.ParallelConsumerOptions.ProcessingOrder;
import io.confluent.parallelconsumer.ParallelStreamProcessor;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Duration;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicInteger;
import java.util.concurrent.atomic.AtomicLong;
import java.util.concurrent.locks.LockSupport;
import org.apache.kafka.clients.consumer.ConsumerConfig;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.kafka.common.serialization.ByteArrayDeserializer;

public class PcBench {
    public static void main(String[] args) throws Exception {
        String bootstrap = args[0], topic = args[1], group = args[2];
        long[] work = Files.readAllLines(Path.of(args[3])).stream()
                .mapToLong(line -> (long) (Double.parseDouble(line.trim()) * 1e9)).toArray();
        int concurrency = Integer.parseInt(args[4]);

        Properties props = new Properties();
        props.put(ConsumerConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        props.put(ConsumerConfig.GROUP_ID_CONFIG, group);
        props.put(ConsumerConfig.ENABLE_AUTO_COMMIT_CONFIG, "false");  // Parallel Consumer commits itself
        props.put(ConsumerConfig.AUTO_OFFSET_RESET_CONFIG, "earliest");
        props.put(ConsumerConfig.KEY_DESERIALIZER_CLASS_CONFIG, ByteArrayDeserializer.class.getName());
        props.put(ConsumerConfig.VALUE_DESERIALIZER_CLASS_CONFIG, ByteArrayDeserializer.class.getName());
        KafkaConsumer<byte[], byte[]> consumer = new KafkaConsumer<>(props);

        ParallelConsumerOptions<byte[], byte[]> options = ParallelConsumerOptions.<byte[], byte[]>builder()
                .ordering(ProcessingOrder.KEY)
                .maxConcurrency(concurrency)
                .commitMode(CommitMode.PERIODIC_CONSUMER_ASYNCHRONOUS)
                .consumer(consumer)
                .build();

        CountDownLatch done = new CountDownLatch(work.length);
        AtomicLong first = new AtomicLong(0), last = new AtomicLong(0);
        AtomicInteger violations = new AtomicInteger();
        Map<String, Long> lastOffset = new ConcurrentHashMap<>();
        long started = System.nanoTime();

        ParallelStreamProcessor<byte[], byte[]> pc = ParallelStreamProcessor.createEosStreamProcessor(options);
        pc.subscribe(List.of(topic));
        pc.poll(context -> {
            ConsumerRecord<byte[], byte[]> record = context.getSingleConsumerRecord();
            first.compareAndSet(0, System.nanoTime());
            String key = new String(record.key());
            Long previous = lastOffset.put(key, record.offset());
            if (previous != null && record.offset() < previous) {
                violations.incrementAndGet();
            }
            LockSupport.parkNanos(work[(int) record.offset()]);
            last.set(System.nanoTime());
            done.countDown();
        });
        boolean finished = done.await(300, TimeUnit.SECONDS);
        pc.close(Duration.ofSeconds(30), DrainingCloseable.DrainingMode.DONT_DRAIN);
        if (!finished) {
            System.err.println("not every record was processed in 300 s: " + done.getCount() + " left");
            System.exit(1);
        }
        System.out.printf("{\"records\": %d, \"wall_s\": %.4f, \"join_s\": %.4f, \"order_violations\": %d, "
                + "\"max_concurrency\": %d}%n", work.length, (last.get() - first.get()) / 1e9,
                (first.get() - started) / 1e9, violations.get(), concurrency);
        System.exit(0);
    }
}
